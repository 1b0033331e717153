"""The layout's meaning holds in the compiled programs: every tensor whose dimension a layout
names is split over that mesh axis, read from the per-device shapes in the compiled HLO (after
XLA's SPMD partitioner), for the train step and the decode loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import model_fns
import sample
from configs import validate
from mesh import build_mesh_layout
from models import gpt2
from optimizers import make_optimizer

BASE = {"n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_vocab": 256, "train_batch_size": 8,
        "attention_types": [[["global"], 2]], "attention_kernel": "plain", "mesh_shape": "x:2,y:4"}
SIZES = {"batch": 8, "sequence": 32, "memory_length": 32, "embd": 64, "heads": 4, "kv": 16, "vocab": 256,
         "intermediate_expanded": 256}
MESH = {"x": 2, "y": 4}

# tensors of the step, by their dimension names (activations, as the model names them)
TENSORS = {
    "residual stream": ("batch", "sequence", "embd"),
    "queries": ("batch", "sequence", "heads", "kv"),
    "keys": ("batch", "memory_length", "heads", "kv"),
    "scores": ("batch", "heads", "sequence", "memory_length"),
    "mlp hidden": ("batch", "sequence", "intermediate_expanded"),
    "logits": ("batch", "sequence", "vocab"),
}


def per_device_shape(dims, layout: dict[str, str]) -> str:
    sizes = [SIZES[d] // MESH[layout[d]] if d in layout else SIZES[d] for d in dims]
    return "[" + ",".join(map(str, sizes)) + "]"


def compiled_train_step(layout_text: str) -> str:
    config = validate(BASE | {"layout": layout_text}, "test")
    layout = build_mesh_layout(config)
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    batch = jax.ShapeDtypeStruct((config.train_batch_size, config.n_ctx), np.int32)
    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    return step.lower(state, batch, batch).compile().as_text()


@pytest.mark.parametrize("layout_text", [
    "batch:x,memory_length:y",
    "batch:x,heads:y",
    "batch:x,intermediate_expanded:y,vocab:y",
    "batch:x,sequence:y",
    "memory_length:x,embd:y",
])
def test_every_tensor_the_layout_names_is_split_in_the_compiled_train_step(layout_text):
    layout = dict(part.split(":") for part in layout_text.split(","))
    hlo = compiled_train_step(layout_text)
    for name, dims in TENSORS.items():
        if not any(d in layout for d in dims):
            continue
        shape = per_device_shape(dims, layout)
        assert f"f32{shape}" in hlo, f"{name} {dims}: no per-device f32{shape} in the step under {layout_text}"


def test_memory_length_changes_the_compiled_step():
    """GPT-Neo XL's layout puts memory_length on a mesh axis: keys, values and scores split along it."""
    assert compiled_train_step("batch:x,memory_length:y") != compiled_train_step("batch:x")


def test_the_decoding_cache_is_split_as_the_layout_names_memory_length_and_heads():
    for layout_text, expected in (("batch:x,memory_length:y", "[4,4,16,16]"), ("batch:x,heads:y", "[4,1,64,16]")):
        config = validate(BASE | {"layout": layout_text}, "test")
        layout = build_mesh_layout(config)
        shape = sample.DecodeShape(batch=8, prompt_slots=16, cache_slots=64)
        settings = sample.SamplingSettings(temperature=0.0)
        run = sample.compiled_decode_loop(config, layout, shape, settings)
        params = gpt2.param_shapes(config)
        tokens = jax.ShapeDtypeStruct((8, 16), np.int32)
        pad = jax.ShapeDtypeStruct((8,), np.int32)
        scalar = jax.ShapeDtypeStruct((), np.int32)
        hlo = run.lower(params, tokens, pad, scalar, scalar, jax.ShapeDtypeStruct((), np.uint32)).compile().as_text()
        assert f"f32{expected}" in hlo, f"cache [batch, heads, memory_length, kv] not split as {layout_text}"
