"""The layout's meaning holds in the compiled programs: every tensor whose dimension a layout
names is split over that mesh axis, read from the per-device shapes in the compiled HLO (after
XLA's SPMD partitioner), for the train step and the decode loop."""

from __future__ import annotations

import functools
import re

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
    return compiled_step_text(validate(BASE | {"layout": layout_text}, "test"))


def compiled_step_text(config) -> str:
    """The HLO text of the config's train step, compiled from shapes alone."""
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
        # data parallel, the step computes each batch replica as one row of a vmap over the batch
        # axis: a device holds its replica's rows behind a leading replica dimension of size 1
        forms = [f"f32{shape}"] + ([f"f32[1,{shape[1:]}"] if "batch" in layout else [])
        assert any(form in hlo for form in forms), f"{name} {dims}: no per-device {forms} in the step under {layout_text}"


def test_memory_length_changes_the_compiled_step():
    """GPT-Neo XL's layout puts memory_length on a mesh axis: keys, values and scores split along it."""
    assert compiled_train_step("batch:x,memory_length:y") != compiled_train_step("batch:x")


def compiled_decode_hlo(config, layout, shape) -> str:
    """The optimized HLO of sample.py's greedy decode loop for `shape` (a sample.DecodeShape),
    compiled from abstract parameters and prompts; `config` as the loop runs it."""
    run = sample.compiled_decode_loop(config, layout, shape, sample.SamplingSettings(temperature=0.0))
    scalar = jax.ShapeDtypeStruct((), np.int32)
    return run.lower(gpt2.param_shapes(config), jax.ShapeDtypeStruct((shape.batch, shape.prompt_slots), np.int32),
                     jax.ShapeDtypeStruct((shape.batch,), np.int32), scalar, scalar,
                     jax.ShapeDtypeStruct((), np.uint32)).compile().as_text()


def test_the_decoding_cache_is_split_as_the_layout_names_memory_length_and_heads():
    for layout_text, expected in (("batch:x,memory_length:y", "[4,4,16,16]"), ("batch:x,heads:y", "[4,1,64,16]")):
        config = validate(BASE | {"layout": layout_text}, "test")
        hlo = compiled_decode_hlo(config, build_mesh_layout(config), sample.DecodeShape(batch=8, prompt_slots=16, cache_slots=64))
        assert f"f32{expected}" in hlo, f"cache [batch, heads, memory_length, kv] not split as {layout_text}"


# --- communication: what the compiled step reduces, and where ----------------------------------

COMMS = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64, "train_batch_size": 32,
         "attention_types": [[["global"], 1]], "attention_kernel": "plain", "mesh_shape": "x:8", "layout": "batch:x"}


@functools.cache
def compiled_hlo(**keys) -> str:
    return compiled_step_text(validate(COMMS | keys, "test"))


def computations(hlo: str) -> dict[str, str]:
    """name -> text of every computation of an HLO module."""
    found = {}
    for block in hlo.split("\n\n"):
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
        if header and "{" in block:
            found[header.group(1)] = block
    return found


def called_from(name: str, comps: dict[str, str]) -> set[str]:
    """`name` and every computation it calls, transitively (fusions, branches, nested loops)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in comps:
            continue
        seen.add(current)
        todo += re.findall(r"(?:calls|body|condition|to_apply|branch_computations|true_computation|"
                           r"false_computation)=\{?%?([\w.\-]+)", comps[current])
        todo += [c.strip().lstrip("%") for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[current])
                 for c in group.split(",")]
    return seen


def all_reduced_shapes(text: str) -> list[str]:
    """The per-device result shapes of every all-reduce in `text`, tuples flattened."""
    shapes = []
    for result in re.findall(r"= (\([^)]*\)|\w+\[[\d,]*\][^ ]*) all-reduce(?:-start)?\(", text):
        shapes += re.findall(r"\w+\[[\d,]*\]", result)
    return shapes


def element_count(shape: str) -> int:
    """"f32[32,4,8]" -> 1024."""
    return int(np.prod([int(n) for n in re.findall(r"\d+", shape.split("[", 1)[1])], dtype=np.int64))


@pytest.mark.parametrize("tokens_per_microbatch", [None, 16])
def test_data_parallel_gradients_are_reduced_once_each_after_the_microbatch_loop(tokens_per_microbatch):
    # 32 rows over 8 replicas = 4 rows x 16 tokens each; 16 tokens per microbatch -> 4 microbatches
    keys = {"tokens_per_mb_per_replica": tokens_per_microbatch} if tokens_per_microbatch else {}
    hlo = compiled_hlo(**keys)
    comps = computations(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bool(bodies) == bool(tokens_per_microbatch), "a microbatch loop, and only with microbatches"
    for body in bodies:
        inside = called_from(body, comps)
        assert not any(all_reduced_shapes(comps[c]) for c in inside), f"an all-reduce inside the loop {body}"
    # every parameter's gradient is reduced exactly once (the tied embedding's lookup and output
    # projection contributions summed before), besides the loss scalars
    reduced = [element_count(shape) for shape in all_reduced_shapes(hlo) if not shape.endswith("[]")]
    parameters = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(gpt2.param_shapes(validate(COMMS, "test")))]
    assert sorted(reduced) == sorted(parameters)


def test_the_cpu_fusion_boundaries_add_no_communication_to_a_sharded_step():
    """cpu_backward auto (the CPU's own backward and residual-gradient boundaries) reduces exactly
    what JAX's derived backward reduces, and keeps its boundaries (one conditional per layer)."""
    auto, plain = compiled_hlo(), compiled_hlo(cpu_backward="plain")  # auto: the default
    assert sorted(all_reduced_shapes(auto)) == sorted(all_reduced_shapes(plain))
    for kind in ("all-gather(", "collective-permute(", "all-to-all(", "reduce-scatter("):
        assert auto.count(kind) == plain.count(kind), kind
    assert auto.count(" conditional(") == COMMS["n_layer"]
