"""Prompt tuning and prefix tuning (models/lora.py): only their weights train, the forward means
what the notes say (checked against the base model fed the same thing by hand), and cached
decoding gives what recomputing the whole sequence gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from test_lora import random_params
from test_train import random_batches

import model_fns
from checkpoints import tree_names
from configs import validate
from mesh import build_mesh_layout
from models import gpt2
from optimizers import make_optimizer
from sample import generate

SMALL = {"n_ctx": 24, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": 64, "train_batch_size": 4,
         "attention_types": [[["global", "local"], 1]], "local_attention_radius": 6, "lr": 1e-2,
         "mesh_shape": "", "layout": ""}
PROMPT = {"prompt_tuning_tokens": 3}
PREFIX = {"num_mem_kv": 2, "prefix_tuning": True, "prefix_mlp_width": 8}
BOTH = PROMPT | PREFIX  # one compiled model serves both checks of each test (suite time)


def test_training_changes_only_the_prompt_and_prefix_weights():
    config = validate({**SMALL, **BOTH}, "test")
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    before = jax.device_get({"base": state["base"], "params": state["params"]})
    expected = {"prompt"} | \
        {f"blocks.0.attn.prefix.{name}" for name in ("seed", "fc", "fc_bias", "k", "k_bias", "v", "v_bias")}
    assert set(tree_names(before["params"])) == expected  # layer 1 is local: memory lives in global layers
    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    for batch in random_batches(config, 2):
        state, metrics = step(state, jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:]))
    after = jax.device_get({"base": state["base"], "params": state["params"]})
    for name, value in tree_names(before["base"]).items():
        np.testing.assert_array_equal(tree_names(after["base"])[name], value, err_msg=name)
    assert all(not np.array_equal(tree_names(after["params"])[n], v) for n, v in tree_names(before["params"]).items()
               if not n.endswith("_bias"))


def test_virtual_tokens_are_embeddings_before_the_text_that_take_no_position():
    """The prompt set to wte[t] + wpe[j] must act as tokens t at positions 0..N-1 before a text
    whose own positions start again at 0: the base model fed exactly that by hand."""
    config = validate({**SMALL, **PROMPT}, "test")
    base_config = validate(SMALL, "test")
    base = random_params(base_config, 1)
    virtual = jnp.asarray([5, 9, 17])
    params = {**base, "prompt": base["wte"][virtual] + base["wpe"][jnp.arange(3)]}
    text = jnp.asarray(random_batches(base_config, 1)[0, :2, :10])
    ours = jax.jit(lambda p: gpt2.logits(p, text, config))(params)
    tokens = jnp.concatenate([jnp.broadcast_to(virtual, (2, 3)), text], axis=1)
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(3), jnp.arange(10)]), tokens.shape)

    @jax.jit
    def reference(p):
        hidden, _, _ = gpt2.forward(p, tokens, base_config, positions=positions)
        return gpt2.unembed(hidden, gpt2.output_weights(p, base_config), base_config)[:, 3:]

    np.testing.assert_allclose(ours, reference(base), rtol=1e-5, atol=1e-5)


def test_the_prefix_mlp_gives_the_memory_of_a_plain_mem_kv_model():
    config = validate({**SMALL, **PREFIX}, "test")
    params = random_params(config, 1)
    prefix = params["blocks"][0]["attn"]["prefix"]
    hidden = np.tanh(np.asarray(prefix["seed"]) @ np.asarray(prefix["fc"]) + np.asarray(prefix["fc_bias"]))
    memory = {name: np.einsum("nj,jhk->nhk", hidden, np.asarray(prefix[name])) + np.asarray(prefix[f"{name}_bias"])
              for name in ("k", "v")}
    plain_config = validate({**SMALL, "num_mem_kv": 2}, "test")
    plain = jax.tree.map(lambda x: x, params)
    attn = {n: w for n, w in plain["blocks"][0]["attn"].items() if n != "prefix"}
    plain["blocks"][0]["attn"] = attn | {"mem_k": jnp.asarray(memory["k"]), "mem_v": jnp.asarray(memory["v"])}
    text = jnp.asarray(random_batches(config, 1)[0, :2, :12])
    adapted = jax.jit(lambda p: gpt2.logits(p, text, config))(params)
    np.testing.assert_allclose(adapted, jax.jit(lambda p: gpt2.logits(p, text, plain_config))(plain),
                               rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_recomputing_the_whole_sequence():
    """Greedy generation (the compiled decode loop: prefill, then one token at a time from the
    cache; rows of different lengths left-padded) against argmax of a full forward each step."""
    config = validate({**SMALL, **BOTH}, "test")
    params = random_params(config, 2)
    rows = [[3, 7, 11, 2, 9], [4, 8]]
    samples = generate(params, config, rows, max_new_tokens=8, temperature=0.0, eos_id=None)
    full = jax.jit(lambda tokens: gpt2.logits(params, tokens, config))
    for row, generated in zip(rows, samples.tokens):
        sequence = list(row)
        for _ in range(8):  # right padding to one length: causal, so it changes no earlier position
            padded = np.zeros((1, config.n_ctx), np.int32)
            padded[0, :len(sequence)] = sequence
            sequence.append(int(np.argmax(np.asarray(full(jnp.asarray(padded)))[0, len(sequence) - 1])))
        assert generated == sequence[len(row):]
    assert len({tuple(t) for t in samples.tokens}) > 1  # the rows continue differently
