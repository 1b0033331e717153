"""fsdp_axes: weights, their gradients and optimizer state sharded over mesh axes beside the
layout, gathered where the forward uses them. Training is the single-device training, a device
holds 1/N of the state, and checkpoints move between FSDP and plain layouts unchanged."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from test_layout import called_from, computations, element_count
from test_train import TINY, assert_same_params, random_batches, run_steps, write_dataset

import model_fns
from configs import load_config, validate
from errors import ConfigError
from mesh import build_mesh_layout
from models import gpt2
from optimizers import make_optimizer

ONE_LAYER = {**TINY, "n_layer": 1, "attention_types": [[["global"], 1]]}


@pytest.mark.parametrize("mesh_shape,layout,extra", [
    # 8 rows over 4 replicas = 2 rows x 32 tokens each; 32 tokens per microbatch -> 2 microbatches
    ("x:4,y:2", "batch:x,heads:y", {"tokens_per_mb_per_replica": 32}),
    ("x:8", "batch:x", {"embed_dropout": 0.1}),  # random draws: one forward over the whole batch
], ids=["x4y2-heads-microbatches", "x8-dropout"])
def test_fsdp_training_equals_single_device_training(mesh_shape, layout, extra):
    options = {**ONE_LAYER, **extra}
    # one device, in one microbatch: the microbatches sum to the same update (test_train's own test)
    single = validate({**options, "mesh_shape": "", "layout": "", "tokens_per_mb_per_replica": None}, "test")
    batches = random_batches(single, 3)
    expected_losses, expected_params = run_steps(single, jax.devices()[:1], batches)
    config = validate({**options, "mesh_shape": mesh_shape, "layout": layout, "fsdp_axes": "x"}, "test")
    losses, params = run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_same_params(params, expected_params, rtol=1e-4)  # Adam's first steps magnify rounding in small biases


def per_device_bytes(shardings, shapes) -> int:
    """What one device holds of a tree of arrays placed by `shardings`."""
    return sum(math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for s, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))


def test_a_device_holds_an_eighth_of_the_adam_state():
    config = validate({**TINY, "mesh_shape": "x:8", "layout": "batch:x", "fsdp_axes": "x"}, "test")
    optimizer = make_optimizer(config)
    shapes = jax.eval_shape(optimizer.init, gpt2.param_shapes(config))
    expected = gpt2.parameter_count(config) * 12 / 8  # float32 parameters and Adam's two moments, over 8 devices
    for fsdp_axes, share in (("x", 1), ("", 8)):  # the layout alone (data parallel): all of it on every device
        shardings = model_fns.state_shardings(config.replace(fsdp_axes=fsdp_axes),
                                              build_mesh_layout(config.replace(fsdp_axes=fsdp_axes)), optimizer)
        held = per_device_bytes([shardings["params"], shardings["opt_state"]], [gpt2.param_shapes(config), shapes])
        assert held == pytest.approx(expected * share, rel=0.01), fsdp_axes


def test_fsdp_shards_each_weight_along_its_largest_dimension_the_layout_leaves_whole():
    config = validate({**TINY, "n_vocab": 250, "mesh_shape": "x:4,y:2", "layout": "batch:x,heads:y",
                       "fsdp_axes": "x"}, "test")
    specs = jax.tree.map(lambda s: tuple(s.spec), model_fns.param_shardings(config, build_mesh_layout(config)))
    block = specs["blocks"][0]
    assert block["attn"]["q"] == ("x", "y", None)  # [embd 64, heads 4 (layout: y), kv 16]
    assert block["mlp"]["fc"] == (None, "x")  # [embd 64, intermediate_expanded 256]
    assert specs["wte"] == (None, "x")  # [vocab 250 (does not divide by 4), embd 64]
    assert specs["wpe"] == (None, "x")  # [embed_sequence 32, embd 64]


def test_the_fsdp_step_gathers_the_weights_and_reduces_each_gradient_once_after_the_microbatch_loop():
    keys = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64, "train_batch_size": 32,
            "attention_types": [[["global"], 1]], "attention_kernel": "plain", "mesh_shape": "x:8",
            "layout": "batch:x", "fsdp_axes": "x", "tokens_per_mb_per_replica": 16}  # 4 microbatches
    config = validate(keys, "test")
    layout = build_mesh_layout(config)
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    batch = jax.ShapeDtypeStruct((config.train_batch_size, config.n_ctx), np.int32)
    compiled = model_fns.make_train_step(config, layout, optimizer, shardings).lower(state, batch, batch).compile()
    # what --dry_run reports: the step's arguments are an eighth of the state (12 bytes a parameter),
    # the device's rows of inputs and labels, and the two step counters
    arguments = gpt2.parameter_count(config) * 12 / 8 + 2 * (32 // 8) * 16 * 4 + 2 * 4
    assert compiled.memory_analysis().argument_size_in_bytes == pytest.approx(arguments, rel=0.01)
    hlo = compiled.as_text()
    parameters = [leaf.shape for leaf in jax.tree.leaves(gpt2.param_shapes(config))]
    gathered = {tuple(int(n) for n in shape.split(",") if n)
                for shape in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)}
    assert {shape for shape in parameters if len(shape) > 1} <= gathered, "a weight matrix used ungathered"
    comps = computations(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies, "a microbatch loop"
    reductions = reduced_shapes(hlo)
    for body in bodies:
        assert not any(reduced_shapes(comps[c]) for c in called_from(body, comps)), f"a reduction inside {body}"
    # each parameter's gradient reduced once, whole (XLA:CPU; a GPU or TPU turns an all-reduce
    # whose result each device slices into a reduce-scatter) or scattered into 8 shards
    sizes = sorted(element_count(shape) for shape in reductions if not shape.endswith("[]"))
    whole = sorted(math.prod(shape) for shape in parameters)
    assert sizes in (whole, sorted(n // 8 for n in whole)), sizes


def reduced_shapes(text: str) -> list[str]:
    """The per-device result shapes of every all-reduce and reduce-scatter in `text`, tuples flattened."""
    shapes = []
    for result in re.findall(r"= (\([^)]*\)|\w+\[[\d,]*\][^ ]*) (?:all-reduce|reduce-scatter)(?:-start)?\(", text):
        shapes += re.findall(r"\w+\[[\d,]*\]", result)
    return shapes


def test_checkpoints_move_between_fsdp_and_plain_layouts(tmp_path):
    import train
    from checkpoints import restore_params

    model_config = write_dataset(tmp_path, TINY["n_vocab"])

    def config(*overrides):
        return load_config(str(model_config), [f"model_path={tmp_path / 'run'}", "eval_steps=0", "mesh_shape=x:8",
                                               "layout=batch:x", "n_layer=1", 'attention_types=[[["global"], 1]]',
                                               *overrides])

    plain, fsdp = config("train_steps=1"), config("train_steps=2", "fsdp_axes=x")
    train.run(plain, layout=build_mesh_layout(plain))  # step 1, saved without FSDP
    assert train.run(fsdp, layout=build_mesh_layout(fsdp)).start_step == 1  # resumed into FSDP shardings, saved
    single = config("mesh_shape=", "layout=")
    for step in (1, 2):
        expected, _ = restore_params(single, build_mesh_layout(single, jax.devices()[:1]), step)
        for other in (plain, fsdp):
            params, _ = restore_params(other, build_mesh_layout(other), step)
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(expected))
    params, _ = restore_params(fsdp, build_mesh_layout(fsdp), 2)
    table = params["wte"]  # [vocab 256, embd 64]: 32 rows a device
    assert table.addressable_shards[0].data.shape == (32, 64)


@pytest.mark.parametrize("value,message", [
    ("z", "key 'fsdp_axes' = 'z': 'z' is not an axis of mesh_shape (axes: x, y)"),
    ("x,x", "key 'fsdp_axes' = 'x,x': axis 'x' appears twice"),
])
def test_an_fsdp_axis_not_in_the_mesh_is_refused_naming_the_key_value_and_axes(value, message):
    with pytest.raises(ConfigError, match=f"^test: {message}".replace("(", r"\(").replace(")", r"\)")):
        validate({**TINY, "mesh_shape": "x:4,y:2", "layout": "batch:x", "fsdp_axes": value}, "test")
