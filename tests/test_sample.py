"""Sampling (sample.py): the KV cache against full recomputation, the logit filters, seeds,
sharding, and `--predict` end to end with a real checkpoint and a real tokenizer.

Models are tiny (n_ctx 64, n_embd 32) so every test runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_layout import called_from, compiled_decode_hlo, computations

from checkpoints import CheckpointMeta, Checkpoints
from configs import load_config, validate
from encoders import load_dataset_tokenizer
from errors import ConfigError
from mesh import build_mesh_layout
from models import gpt2
from sample import (
    DecodeShape,
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    choose_tokens,
    generate,
    run_predict,
    sample_header,
    sampling_layout,
)

REPO = Path(__file__).resolve().parent.parent
MIXED_KINDS = [[["global", "local", "none", "local"], 1]]


def tiny_config(**overrides):
    values = {"n_layer": 4, "n_embd": 32, "n_head": 4, "n_ctx": 64, "n_vocab": 128, "attention_types": MIXED_KINDS,
              "local_attention_radius": 8, "layer_norm_epsilon": 1e-5}
    return validate(values | overrides, "tests/test_sample.py")


def peaked_params(config, seed: int = 0, scale: float = 8.0):
    """Random parameters scaled up, so that logits are far apart and greedy choices are never
    near-ties that float rounding could flip between two correct implementations."""
    params = gpt2.init_params(config, jax.random.key(seed))
    return jax.tree.map(lambda w: scale * w, params)


def full_recompute_greedy(params, config, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: rerun the whole model over the sequence for every new token, no cache.
    The sequence is right-padded to n_ctx so one compiled program serves every length (causal
    attention: the padding after the last real token cannot change its logits)."""
    all_logits = jax.jit(lambda tokens: gpt2.logits(params, tokens, config))
    tokens = list(prompt)
    for _ in range(new_tokens):
        padded = np.zeros((1, config.n_ctx), np.int32)
        padded[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(all_logits(padded)[0, len(tokens) - 1])))
    return tokens[len(prompt):]


# --- the cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [8, 24])  # 8: prompts longer than the ring; 24: a ring longer than the prompt bucket
def test_cached_greedy_decoding_equals_full_recompute_for_global_local_and_none_layers(radius):
    config = tiny_config(local_attention_radius=radius)
    params = peaked_params(config)
    prompts = [[5, 6, 7], list(range(1, 19))]  # different lengths in one batch: left padding, per-row positions
    samples = generate(params, config, prompts, max_new_tokens=40, temperature=0.0)
    for prompt, tokens in zip(prompts, samples.tokens):
        assert tokens == full_recompute_greedy(params, config, prompt, 40)


# GPT-Neo's architecture options, each on its own and together
DECODING_OPTIONS = {
    "rotary": {"rotary_emb": True},
    "axial": {"axial_pos_emb": [8, 8]},
    "scalenorm": {"scalenorm": True},
    "rezero": {"rezero": True},
    "swiglu": {"mlp_glu": True, "activation_function": "silu"},
    "untied": {"no_weight_tie": True},
    "shared": {"share_parameters": True},
    "macaron": {"macaron": True, "rezero": True},
    "together": {"share_parameters": True, "rotary_emb": True, "scalenorm": True, "mlp_glu": True,
                 "activation_function": "silu", "no_weight_tie": True, "macaron": True},
    "every kind, rotary, mem-kv": {"n_layer": 5, "attention_types": [[["global", "local", "linear", "none", "gau"], 1]],
                                   "rotary_emb": True, "num_mem_kv": 3, "gau_key_size": 16},
    "every kind, shared": {"n_layer": 5, "attention_types": [[["linear", "global", "gau", "local", "linear"], 1]],
                           "share_parameters": True, "num_mem_kv": 2, "gau_key_size": 16, "rezero": True},
}
PEAKED_SCALE = {"every kind, rotary, mem-kv": 3.0, "every kind, shared": 3.0}  # 8: linear attention's keys reach ~100


@pytest.mark.parametrize("case", list(DECODING_OPTIONS))
def test_cached_greedy_decoding_equals_full_recompute_with_architecture_options(case):
    config = tiny_config(**DECODING_OPTIONS[case])
    params = peaked_params(config, scale=PEAKED_SCALE.get(case, 8.0))
    params = jax.tree.map(lambda w: w + 0.7 if w.ndim == 0 else w, params)  # scalar gains (ReZero's start at 0)
    prompts = [[5, 6, 7], list(range(1, 19))]
    samples = generate(params, config, prompts, max_new_tokens=30, temperature=0.0)
    for prompt, tokens in zip(prompts, samples.tokens):
        assert tokens == full_recompute_greedy(params, config, prompt, 30)


@pytest.mark.parametrize("batch", [1, 3])
def test_each_decoding_step_writes_the_cache_in_place_without_copying_it(batch):
    """Every kind that caches keys and values (global, a local ring, gau, with memory key/values)
    reads its cache once a step and updates it in place: the compiled loop body copies and
    transposes nothing of a cache's size. (A copy per layer and step is what XLA:CPU makes of a
    write that does not wait for the reads of what it overwrites, or of a cache whose order does
    not suit the step's products: models/kv_cache.py.)"""
    config = tiny_config(n_layer=4, n_ctx=256, attention_types=[[["global", "local", "gau", "none"], 1]],
                         num_mem_kv=2, gau_key_size=16, local_attention_radius=8)
    shape = DecodeShape(batch=batch, prompt_slots=16, cache_slots=208)  # no other array has 208 entries
    hlo = compiled_decode_hlo(config, sampling_layout(None, batch), shape)
    comps = computations(hlo)
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    assert len(bodies) == 1, bodies
    inside = "\n".join(comps[c] for c in called_from(bodies[0], comps))
    cache_sized = [line.strip() for line in inside.splitlines()
                   if re.search(r"= f32\[[\d,]*\b208\b[\d,]*\]\S* (copy|transpose)\(", line)]
    assert not cache_sized, "\n".join(cache_sized[:4])
    # the loop does write them: one update each of the global layer's and gau's keys and values
    assert len(re.findall(r"f32\[[\d,]*\b208\b[\d,]*\]\S* dynamic-update-slice\(", inside)) == 4


@pytest.mark.parametrize("case", ["together", "every kind, rotary, mem-kv"])
def test_decoding_with_the_weights_first_gives_the_tokens_of_full_recompute(case):
    """decode_product weights_first (models/kernels.py) changes only the order of each decoding
    step's products: rows of two prompt lengths (left padding) through every kind of layer and
    the architecture options still decode as the uncached model does."""
    config = tiny_config(**DECODING_OPTIONS[case], decode_product="weights_first")
    params = peaked_params(config, scale=PEAKED_SCALE.get(case, 8.0))
    params = jax.tree.map(lambda w: w + 0.7 if w.ndim == 0 else w, params)
    prompts = [[5, 6, 7], list(range(1, 19))]
    samples = generate(params, config, prompts, max_new_tokens=30, temperature=0.0)
    for prompt, tokens in zip(prompts, samples.tokens):
        assert tokens == full_recompute_greedy(params, config, prompt, 30)


def test_decoding_with_the_weights_first_reads_out_first_copies_made_once_before_the_loop():
    """Each step reads attention's q/k/v weights [embd, heads, kv] as [heads, kv, embd] and its
    output weight [heads, kv, embd] as [embd, heads, kv]: copies that XLA makes once, before the
    loop, not at every step (nothing of a weight's size is transposed or copied in the loop)."""
    config = tiny_config(n_layer=2, n_embd=48, n_head=4, n_ctx=128, n_vocab=320, intermediate_size=176,
                         attention_types=[[["global", "local"], 1]], local_attention_radius=8)
    shape = DecodeShape(batch=3, prompt_slots=16, cache_slots=48)
    carried = {}
    for order in ("rows_first", "weights_first"):
        hlo = compiled_decode_hlo(config.replace(decode_product=order), sampling_layout(None, 3), shape)
        comps = computations(hlo)
        body = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)[0]
        parameter = comps[body].splitlines()[0].split("->")[0]  # what each step reads
        carried[order] = (parameter.count("f32[48,4,12]"), parameter.count("f32[4,12,48]"))
        inside = "\n".join(comps[c] for c in called_from(body, comps))
        moved = [line.strip() for line in inside.splitlines()
                 if (m := re.search(r"= f32\[([\d,]+)\]\S* (copy|transpose)\(", line))
                 and np.prod([int(d) for d in m.group(1).split(",")]) >= 48 * 48]
        assert not moved, (order, moved[:3])
    layers = config.n_layer
    assert carried["rows_first"] == (3 * layers, layers)  # q, k, v as stored; out as stored
    assert carried["weights_first"] == (layers, 3 * layers)  # every one out-first


def test_generation_stops_at_n_ctx_and_a_long_prompt_is_left_truncated(caplog):
    config = tiny_config()
    params = peaked_params(config)
    near_the_end = generate(params, config, list(range(60)), max_new_tokens=40, temperature=0.0)
    assert len(near_the_end.tokens[0]) == config.n_ctx - 60
    assert near_the_end.tokens[0] == full_recompute_greedy(params, config, list(range(60)), 4)

    too_long = [i % 100 for i in range(90)]
    with caplog.at_level("WARNING", logger="neomesh"):
        truncated = generate(params, config, too_long, max_new_tokens=5, temperature=0.0)
    assert "longer than n_ctx" in caplog.text
    assert truncated.prompt_tokens[0] == too_long[-(config.n_ctx - 1):]
    assert truncated.tokens[0] == full_recompute_greedy(params, config, too_long[-(config.n_ctx - 1):], 1)


def test_a_row_stops_at_eos_and_keeps_it():
    config = tiny_config()
    params = peaked_params(config)
    free_running = generate(params, config, [3, 4, 5], max_new_tokens=12, temperature=0.0).tokens[0]
    eos = free_running[5]
    stopped = generate(params, config, [3, 4, 5], max_new_tokens=12, temperature=0.0, eos_id=eos).tokens[0]
    assert stopped == free_running[: free_running.index(eos) + 1]


def test_bad_prompts_are_clear_errors():
    config = tiny_config()
    params = gpt2.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, config, [])
    with pytest.raises(ValueError, match="token id 500"):
        generate(params, config, [1, 500])
    with pytest.raises(ValueError, match="needs tokenizer"):
        generate(params, config, "some text")


# --- logit filters ------------------------------------------------------------------------------

VOCAB = 12
# XLA on CPU flushes subnormals to zero; magnitudes near float32's smallest normal become subnormal once
# divided by a temperature, so logits stay either zero or well above it
finite_logits = arrays(np.float32, (3, VOCAB), elements=st.floats(-20, 20, width=32, allow_subnormal=False)
                       .filter(lambda x: x == 0 or abs(x) > 1e-30))


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.integers(0, VOCAB + 2))
def test_top_k_keeps_the_k_largest_of_each_row(logits, k):
    filtered = np.asarray(apply_top_k(jnp.asarray(logits), k))
    kept = np.isfinite(filtered)
    if k == 0 or k >= VOCAB:
        np.testing.assert_array_equal(filtered, logits)
        return
    for row, keep in zip(logits, kept):
        assert keep.sum() >= k  # more only through ties with the k-th largest
        assert keep.sum() == k or np.sort(row)[::-1][k - 1] == np.sort(row)[::-1][k]
        assert row[keep].min() >= row[~keep].max(initial=-np.inf)
    np.testing.assert_array_equal(filtered[kept], logits[kept])


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_most_likely_set_with_mass_p(logits, p):
    filtered = np.asarray(apply_top_p(jnp.asarray(logits), p))
    kept = np.isfinite(filtered)
    if p >= 1.0:
        np.testing.assert_array_equal(filtered, logits)
        return
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
    for row, prob, keep in zip(logits, probs, kept):
        assert keep[np.argmax(row)]  # the most likely token always stays
        assert row[keep].min() >= row[~keep].max(initial=-np.inf)  # the kept set is a top set
        assert prob[keep].sum() >= p - 1e-5  # it holds at least p
        smallest_kept = row[keep].min()
        assert prob[row > smallest_kept].sum() < p + 1e-5  # without its least likely member(s) it would not
    np.testing.assert_array_equal(filtered[kept], logits[kept])


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.floats(0.05, 5.0))
def test_temperature_rescales_logits_and_keeps_their_order(logits, temperature):
    scaled = np.asarray(apply_temperature(jnp.asarray(logits), temperature))
    np.testing.assert_allclose(scaled * temperature, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argsort(scaled, axis=-1, kind="stable"), np.argsort(logits, axis=-1, kind="stable"))
    probs, base = jax.nn.softmax(scaled, axis=-1), jax.nn.softmax(logits, axis=-1)
    top = np.argmax(logits, axis=-1)[:, None]
    top_prob, base_top = np.take_along_axis(np.asarray(probs), top, -1), np.take_along_axis(np.asarray(base), top, -1)
    if temperature < 1:  # sharpening: the most likely token gains probability; flattening loses it
        assert np.all(top_prob >= base_top - 1e-6)
    else:
        assert np.all(top_prob <= base_top + 1e-6)


@settings(max_examples=60, deadline=None)
@given(finite_logits, arrays(bool, (3, VOCAB)), st.floats(0.1, 10.0))
def test_repetition_penalty_lowers_only_seen_tokens_by_the_penalty(logits, seen, penalty):
    penalised = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty))
    np.testing.assert_array_equal(penalised[~seen], logits[~seen])
    expected = np.where(logits > 0, logits / np.float32(penalty), logits * np.float32(penalty))
    # XLA on CPU flushes subnormal results to zero: below float32's smallest normal, zero is exact enough
    np.testing.assert_allclose(penalised[seen], expected[seen], rtol=1e-6, atol=np.finfo(np.float32).tiny)
    if penalty >= 1:
        assert np.all(penalised <= logits)
    np.testing.assert_array_equal(np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.0)),
                                  logits)


@settings(max_examples=25, deadline=None)
@given(finite_logits, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_sampled_tokens_come_from_the_filtered_set_and_greedy_is_the_argmax(logits, k, seed):
    seen = jnp.zeros(logits.shape, bool)
    rng = jax.random.key(seed)
    sampled = np.asarray(choose_tokens(jnp.asarray(logits), seen, rng, SamplingSettings(temperature=1.0, top_k=k)))
    allowed = np.isfinite(np.asarray(apply_top_k(jnp.asarray(logits), k)))
    assert allowed[np.arange(3), sampled].all()
    greedy = np.asarray(choose_tokens(jnp.asarray(logits), seen, rng, SamplingSettings(temperature=0.0)))
    np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))


# --- seeds --------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_samples_and_different_seeds_differ():
    config = tiny_config(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)
    params = gpt2.init_params(config, jax.random.key(0))  # near-uniform logits: samples vary a lot
    prompts = [[1, 2, 3], [4, 5, 6]]
    first = generate(params, config, prompts, max_new_tokens=20, seed=7).tokens
    again = generate(params, config, prompts, max_new_tokens=20, seed=7).tokens
    other = generate(params, config, prompts, max_new_tokens=20, seed=8).tokens
    assert first == again
    assert first != other
    assert first[0] != first[1]  # rows draw independently


# --- sharding -----------------------------------------------------------------------------------

SHARDED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    sys.path.insert(0, os.getcwd())
    from configs import validate
    from mesh import build_mesh_layout
    from models import gpt2
    from sample import generate
    config = validate({"n_layer": 4, "n_embd": 32, "n_head": 4, "n_ctx": 64, "n_vocab": 128,
                       "attention_types": [[["global", "local", "none", "local"], 1]], "local_attention_radius": 8,
                       "mesh_shape": "x:2,y:4", "layout": "batch:x,heads:y"}, "sharded")
    layout = build_mesh_layout(config)
    assert jax.device_count() == 8
    params = jax.tree.map(lambda w: 8.0 * w, gpt2.init_params(config, jax.random.key(0)))
    prompts = [[5, 6, 7], list(range(1, 19))]
    result = {}
    for name, lay in (("one_device", None), ("sharded", layout)):
        result[name] = {
            "greedy": generate(params, config, prompts, layout=lay, max_new_tokens=30, temperature=0.0).tokens,
            "sampled": generate(params, config, prompts, layout=lay, max_new_tokens=30, temperature=1.0,
                                top_k=20, seed=3).tokens,
            "batch_of_one": generate(params, config, prompts[:1], layout=lay, max_new_tokens=30,
                                     temperature=0.0).tokens,
        }
    # fsdp_axes: the weights sharded over x too, gathered once for the whole generation
    fsdp = build_mesh_layout(config.replace(fsdp_axes="x"))
    result["fsdp"] = generate(params, config, prompts, layout=fsdp, max_new_tokens=30, temperature=0.0).tokens
    # each decoding step's products the other way round (models/kernels.py weights_first), from
    # weights split over heads and gathered from their fsdp shards
    weights_first = config.replace(decode_product="weights_first")
    result["weights_first"] = generate(params, weights_first, prompts, layout=fsdp, max_new_tokens=30,
                                       temperature=0.0).tokens
    print(json.dumps(result))
""")


def test_sharded_decoding_on_8_devices_gives_the_tokens_of_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sharded"] == result["one_device"]
    assert result["fsdp"] == result["one_device"]["greedy"]
    assert result["weights_first"] == result["one_device"]["greedy"]
    assert result["one_device"]["batch_of_one"][0] == result["one_device"]["greedy"][0]


# --- main.py --predict --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    """A real tokenizer trained here, dataset and model configs pointing at it, and a checkpoint
    at step 7 of random parameters saved with Checkpoints."""
    from test_train import train_tiny_tokenizer

    workdir = tmp_path_factory.mktemp("predict")
    corpus = ["the named mesh shards every tensor by its dimension names", "a layout maps heads to a mesh axis",
              "sampling keeps a cache of keys and values for every layer"] * 20
    tokenizer_file = workdir / "tokenizer.json"
    train_tiny_tokenizer(corpus, tokenizer_file, ["<|endoftext|>", "<|padding|>"])

    (workdir / "configs" / "dataset_configs").mkdir(parents=True)
    (workdir / "configs" / "dataset_configs" / "tiny.json").write_text(json.dumps(
        {"path": str(workdir / "shards" / "*.tfrecords"), "tokenizer_path": str(tokenizer_file), "eos_id": 0}))
    model_config = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_ctx": 64, "n_vocab": 320,
                    "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
                    "model_path": str(workdir / "model"), "datasets": [["tiny", 1, "documents_random", 1.0]],
                    "predict_batch_size": 3, "predict_max_steps": 12}
    config_file = workdir / "configs" / "tiny_model.json"
    config_file.write_text(json.dumps(model_config))
    config = load_config(str(config_file))

    params = gpt2.init_params(config, jax.random.key(0))
    checkpoints = Checkpoints(config.model_path, asynchronous=False)
    checkpoints.save(7, {"params": params, "opt_state": None}, CheckpointMeta.for_config(config, 7, params_only=True))
    checkpoints.close()
    return workdir, config, params


def test_predict_writes_sample_sections_continuing_the_prompt(predict_setup, capsys):
    workdir, config, params = predict_setup
    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text("the named mesh")
    layout = build_mesh_layout(config, jax.devices()[:1])

    path = run_predict(config, layout, str(prompt_file))

    assert path == str(Path(config.model_path) / "predictions_nosacred_7.txt")
    written = Path(path).read_text()
    tokenizer = load_dataset_tokenizer(config)
    expected = generate(params, config, [tokenizer.encode("the named mesh")] * 3, tokenizer=tokenizer, eos_id=0)
    prompt_text = tokenizer.decode(tokenizer.encode("the named mesh"))
    for i, completion in enumerate(expected.texts):
        assert f" SAMPLE {i} " in written
        assert f"\n{prompt_text}{completion}\n" in written
    assert " SAMPLE 3 " not in written
    assert written.strip() and written.split("\n", 1)[1] in capsys.readouterr().out


def test_predict_with_remove_partial_sequences_writes_only_the_new_tokens(predict_setup):
    workdir, config, params = predict_setup
    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text("the named mesh")
    config = config.replace(remove_partial_sequences=True)
    written = Path(run_predict(config, build_mesh_layout(config, jax.devices()[:1]), str(prompt_file), "partial")).read_text()
    tokenizer = load_dataset_tokenizer(config)
    expected = generate(params, config, [tokenizer.encode("the named mesh")] * 3, tokenizer=tokenizer, eos_id=0)
    for i, completion in enumerate(expected.texts):
        assert f" SAMPLE {i} " + "=" * 40 + f"\n{completion}\n" in written
    assert "the named mesh" not in written


@pytest.mark.parametrize("source", ["config key", "dataset config", "tokenizer"])
def test_generate_predict_and_export_choose_the_same_eos_when_its_sources_differ(predict_setup, source):
    """The config key, the dataset config and the tokenizer (eos 0) name three different ids; the one
    that wins by configs.special_ids' precedence is the first token greedy decoding emits (the others
    are never emitted), so generate and --predict stop at once exactly when they chose it, and export
    must write it as HF's eos."""
    workdir, base, params = predict_setup
    tokenizer = load_dataset_tokenizer(base)
    prompt = tokenizer.encode("the named mesh")
    free = generate(params, base, prompt, temperature=0.0, max_new_tokens=12, eos_id=-1).tokens[0]  # -1: never
    unused = [t for t in range(2, tokenizer.vocab_size) if t not in free]
    winner = free[0] if source != "tokenizer" else tokenizer.eos_id
    assert winner != tokenizer.eos_id or source == "tokenizer"
    configs_dir = workdir / f"eos-{source.replace(' ', '-')}"
    (configs_dir / "dataset_configs").mkdir(parents=True)
    dataset = json.loads((workdir / "configs" / "dataset_configs" / "tiny.json").read_text())
    dataset.pop("eos_id")
    values = json.loads((workdir / "configs" / "tiny_model.json").read_text()) | {"predict_batch_size": 1,
                                                                                   "temperature": 0.0}
    if source == "config key":
        values["eos_id"], dataset["eos_id"] = winner, unused[0]
    elif source == "dataset config":
        dataset["eos_id"] = winner
    (configs_dir / "dataset_configs" / "tiny.json").write_text(json.dumps(dataset))
    (configs_dir / "model.json").write_text(json.dumps(values))
    config = load_config(str(configs_dir / "model.json"))
    stop = free.index(winner) if winner in free else len(free) - 1

    generated = generate(params, config, prompt, tokenizer=tokenizer, max_new_tokens=12).tokens[0]
    assert generated == free[: stop + 1]
    if source != "tokenizer":
        assert generated == [winner]
    (configs_dir / "prompt.txt").write_text("the named mesh")
    written = Path(run_predict(config, build_mesh_layout(config, jax.devices()[:1]), str(configs_dir / "prompt.txt")))
    shown = free[:stop] if winner in free else free
    assert f"{sample_header(0)}\n{tokenizer.decode(prompt)}{tokenizer.decode(shown)}\n" in written.read_text()
    import export

    out = export.export_to_hf(config, configs_dir / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == winner
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == tokenizer.tokenizer.id_to_token(winner)


def test_predict_without_a_prompt_uses_the_default_and_names_the_sacred_id(predict_setup):
    workdir, config, _ = predict_setup
    path = run_predict(config, build_mesh_layout(config, jax.devices()[:1]), None, sacred_id="run42")
    assert Path(path).name == "predictions_run42_7.txt"
    assert "SAMPLE 0" in Path(path).read_text()


def test_main_predict_with_entmax_sampling_draws_only_tokens_inside_entmax_support(predict_setup, capsys):
    """main.py --predict --entmax_sampling writes generate(..., entmax_sampling=True)'s samples, which
    are not softmax's; replayed through the model without a cache, each new token had a non-zero
    entmax-1.3 probability given the tokens before it (entmax written plainly here, in float64). The
    checkpoint's logits are nearly uniform; temperature 0.1 spreads them so that entmax has zeros."""
    import main

    workdir, _, params = predict_setup
    prompt_file = workdir / "entmax_prompt.txt"
    prompt_file.write_text("a layout maps")
    config_file = str(workdir / "configs" / "tiny_model.json")
    assert main.main(["--model", config_file, "--predict", "--entmax_sampling", "--prompt", str(prompt_file),
                      "--sacred_id", "entmax", "--set", "temperature=0.1"]) == 0
    config = load_config(config_file, ["temperature=0.1"])  # main.py's: its compiled program is reused
    written = (Path(config.model_path) / "predictions_entmax_7.txt").read_text()
    tokenizer = load_dataset_tokenizer(config)
    prompt = tokenizer.encode("a layout maps")
    layout = build_mesh_layout(config)  # the layout main.py builds
    entmax_samples = generate(params, config, [prompt] * 3, tokenizer=tokenizer, layout=layout, entmax_sampling=True)
    softmax_samples = generate(params, config, [prompt] * 3, tokenizer=tokenizer, layout=layout)
    for completion in entmax_samples.texts:
        assert f"\n{tokenizer.decode(prompt)}{completion}\n" in written
    assert entmax_samples.tokens != softmax_samples.tokens

    def exact_entmax_support(z, alpha=1.3):  # tokens with (α-1) z_i above τ, τ by float64 bisection
        s = (alpha - 1) * np.asarray(z, np.float64)
        low, high = s.max() - 1.0, s.max()
        for _ in range(200):
            middle = (low + high) / 2
            mass = np.sum(np.maximum(s - middle, 0) ** (1 / (alpha - 1)))
            low, high = (middle, high) if mass >= 1 else (low, middle)
        return s > high

    all_logits = jax.jit(lambda tokens: gpt2.logits(params, tokens, config))
    support_sizes = []
    for row in entmax_samples.tokens:
        logits = np.asarray(all_logits(jnp.asarray([prompt + row])))[0]
        for t, token in enumerate(row):
            support = exact_entmax_support(logits[len(prompt) - 1 + t] / config.temperature)
            assert support[token]
            support_sizes.append(support.sum())
    assert max(support_sizes) < config.n_vocab  # entmax left some tokens out: the check has teeth


def test_predict_refuses_an_empty_prompt_file_by_name(predict_setup):
    workdir, config, _ = predict_setup
    empty = workdir / "empty_prompt.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty_prompt.txt.*empty"):
        run_predict(config, build_mesh_layout(config, jax.devices()[:1]), str(empty))
    with pytest.raises(ConfigError, match="missing.txt: no such file"):
        run_predict(config, build_mesh_layout(config, jax.devices()[:1]), str(workdir / "missing.txt"))


@pytest.mark.parametrize("chunks", [[5, 11, 24], [1] * 12 + [28]])  # one chunk of 40 is the prefill every decoding test runs
def test_the_forward_over_a_cache_in_chunks_equals_one_pass_without_it(chunks):
    """The one forward, fed a sequence piece by piece through its cache (prefill of any length,
    then more of any length: rings that wrap inside a piece), gives the hidden states of one
    pass over the whole sequence, for global, local (radius 8, shorter than most pieces) and none layers."""
    config = tiny_config()
    params = gpt2.init_params(config, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, sum(chunks)), 0, config.n_vocab)
    whole, _, _ = gpt2.forward(params, tokens, config)
    cache = gpt2.init_cache(config, 2, 64)
    pieces, start = [], 0
    for length in chunks:
        hidden, cache, _ = gpt2.forward(params, tokens[:, start:start + length], config, cache=cache)
        pieces.append(hidden)
        start += length
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=1e-5, atol=1e-5)
    assert int(cache["next_slot"]) == sum(chunks)
