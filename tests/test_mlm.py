"""The masked-LM objective (mlm_training): masking inside the deterministic sampler, attention
that sees both ways in every kind, the loss at the masked positions only, and main.py training,
evaluating and refusing to sample an MLM model. Real TFRecord shards in a temp dir throughout."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from test_train import SHARED_COMPILATION

import model_fns
from configs import load_config, validate
from errors import ConfigError
from inputs import Sampler
from mesh import build_mesh_layout
from models import gpt2
from optimizers import make_optimizer
from tfrecord import write_shard

REPO = Path(__file__).resolve().parent.parent
N_VOCAB, N_CTX, BATCH = 256, 64, 16
EOS, PAD, MASK, CLS = 0, 1, 3, 4  # GPT-Neo's test_models.py MLM ids: mask 3, cls 4
IGNORED = [5, 6]
FIRST_TEXT_ID = 7  # the documents hold ids 7.., and the ignored ids, never a special id
MLM = {"mlm_training": True, "mlm_mask_id": MASK, "mlm_cls_token_id": CLS, "mlm_mask_prob": 0.15,
       "mlm_same_token_prob": 0.1, "mlm_random_token_prob": 0.1, "mlm_mask_ignore_ids": IGNORED}
NOT_PREDICTED = -1


def write_mlm_dataset(folder: Path, mode: str = "documents_random", stitch: int = 2, short: bool = False,
                      **overrides) -> Path:
    """Shards of random documents in which the ignored ids are common; a model config beside them."""
    rng = np.random.default_rng(0)
    shards = folder / "shards"
    shards.mkdir(parents=True)
    lengths = (5, 40) if short else (20, 90)
    docs = []
    for _ in range(80):
        doc = rng.integers(FIRST_TEXT_ID, N_VOCAB, rng.integers(*lengths))
        doc[rng.random(len(doc)) < 0.1] = rng.choice(IGNORED)
        docs.append(doc)
    write_shard(str(shards / "mlm_0_40.tfrecords"), docs[:40])
    write_shard(str(shards / "mlm_1_40.tfrecords"), docs[40:])
    (folder / "dataset_configs").mkdir()
    (folder / "dataset_configs" / "mlm.json").write_text(json.dumps({
        "n_vocab": N_VOCAB, "path": str(shards / "*.tfrecords"), "eval_path": str(shards / "mlm_1_*.tfrecords"),
        "eos_id": EOS, "padding_id": PAD, "tokenizer_path": ""}))
    config = {"n_ctx": N_CTX, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": N_VOCAB, "train_batch_size": BATCH,
              "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8,
              "datasets": [["mlm", stitch, mode, 1.0]], "mesh_shape": "", "layout": "", **MLM, **overrides}
    path = folder / "model.json"
    path.write_text(json.dumps(config))
    return path


def sampled(sampler: Sampler, steps: range):
    """(inputs, labels, text) of these steps' batches; text, the reference: the CLS token, then the
    first n_ctx - 1 tokens of each row as the causal sampler gives it."""
    inputs, labels = (np.concatenate(part) for part in zip(*(sampler.inputs_and_labels(s, range(BATCH), BATCH)
                                                               for s in steps)))
    rows = np.concatenate([sampler.rows(s, range(BATCH), BATCH) for s in steps])
    text = np.concatenate([np.full((len(rows), 1), CLS), rows[:, :N_CTX - 1]], axis=1)
    return inputs, labels, text


# --- masking in the sampler ------------------------------------------------------------------------


def test_masking_follows_the_configured_probabilities_and_never_masks_cls_padding_or_ignored_ids(tmp_path):
    sampler = Sampler(load_config(str(write_mlm_dataset(tmp_path))))
    inputs, labels, text = sampled(sampler, range(24))
    chosen = labels != NOT_PREDICTED
    np.testing.assert_array_equal(labels[chosen], text[chosen])  # labels: the original token, where masked
    np.testing.assert_array_equal(inputs[~chosen], text[~chosen])  # the rest of the row as it was
    assert (inputs[:, 0] == CLS).all() and not chosen[:, 0].any()
    maskable = ~np.isin(text, [CLS, PAD, *IGNORED])
    assert np.isin(text, IGNORED).sum() > 1000  # the ignored ids are there to be skipped
    assert not chosen[~maskable].any()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01

    shown, original = inputs[chosen], text[chosen]
    assert chosen.sum() > 3000
    assert abs(np.mean(shown == MASK) - 0.8) < 0.03  # 1 - same - random
    assert abs(np.mean(shown == original) - 0.1) < 0.02  # a random id equal to the original is 1 in ~250
    replaced = shown[(shown != MASK) & (shown != original)]
    assert abs(len(replaced) / len(shown) - 0.1) < 0.02
    assert replaced.max() < N_VOCAB and not np.isin(replaced, [PAD, MASK, CLS, *IGNORED]).any()
    assert len(np.unique(replaced)) > 100  # drawn from the whole vocabulary


def test_padding_is_never_masked_in_chunks_mode(tmp_path):
    sampler = Sampler(load_config(str(write_mlm_dataset(tmp_path, "chunks", 1, short=True))))
    inputs, labels, text = sampled(sampler, range(4))
    padding = text == PAD
    assert padding.sum() > 1000
    assert (labels[padding] == NOT_PREDICTED).all() and (inputs[padding] == PAD).all()
    assert 0.1 < (labels != NOT_PREDICTED).sum() / (~padding).sum() < 0.2


def test_a_fresh_sampler_masks_every_step_and_row_as_an_uninterrupted_one(tmp_path):
    config = load_config(str(write_mlm_dataset(tmp_path)))
    uninterrupted = Sampler(config)
    history = {step: uninterrupted.inputs_and_labels(step, range(BATCH), BATCH) for step in range(8)}
    resumed = Sampler(config)  # a new process resuming at step 5
    for step in (5, 6, 7):
        for got, expected in zip(resumed.inputs_and_labels(step, range(BATCH), BATCH), history[step]):
            np.testing.assert_array_equal(got, expected)
    some = resumed.inputs_and_labels(3, [9, 2], BATCH)  # a host that holds only some rows
    for got, expected in zip(some, history[3]):
        np.testing.assert_array_equal(got, expected[[9, 2]])
    assert not np.array_equal(history[0][1], history[1][1])
    other_seed = Sampler(config.replace(seed=1)).inputs_and_labels(0, range(BATCH), BATCH)
    assert not np.array_equal(other_seed[1], history[0][1])


# --- attention both ways ----------------------------------------------------------------------------

VISIBILITY = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 1, "n_vocab": 64, "local_attention_radius": 4,
              "gau_key_size": 16, "mlm_mask_id": MASK}


def position_5_changes(kind: str, mlm: bool, changed_position: int) -> bool:
    """Whether the logits at position 5 of a one-layer model change when another token changes:
    clearly (seen), or only by float rounding (not seen; linear attention's rescaling by the
    largest key of a chunk moves every output by rounding, however causal)."""
    params, logits = one_layer_params(kind), one_layer_logits(kind, mlm)
    tokens = np.random.default_rng(2).integers(7, 64, (1, 16))
    changed = tokens.copy()
    changed[0, changed_position] = (tokens[0, changed_position] + 11) % 57 + 7
    difference = float(np.abs(np.asarray(logits(params, tokens) - logits(params, changed))[0, 5]).max())
    assert difference > 1e-5 or difference < 1e-6, difference  # clearly one or the other
    return difference > 1e-5


@functools.cache
def one_layer_logits(kind: str, mlm: bool):
    config = validate({**VISIBILITY, "attention_types": [[[kind], 1]], "mlm_training": mlm}, "test")
    return jax.jit(lambda params, tokens: gpt2.logits(params, tokens, config))


@functools.cache
def one_layer_params(kind: str):
    """The parameters of a one-layer model of this kind (mlm_training shapes no weight), with
    attention weights larger than the init's, so that one key's effect stands far above rounding:
    the values and outputs (softmax scores as they are: larger ones would pick one key), and gau's
    tiny relu(q.k)^2 scores too."""
    params = gpt2.init_params(validate({**VISIBILITY, "attention_types": [[[kind], 1]]}, "test"), jax.random.key(1))
    scale = {"v": 8, "out": 8, "gau_v": 8, "gau_w": 8, "gau_out": 8, "gau_q": 4, "gau_k": 4}
    params["blocks"][0]["attn"] = {name: w * scale.get(name, 1) for name, w in params["blocks"][0].get("attn", {}).items()}
    return params


@pytest.mark.parametrize("kind", ["global", "linear", "gau"])
def test_an_mlm_model_sees_future_tokens_and_a_causal_one_does_not(kind):
    assert position_5_changes(kind, mlm=True, changed_position=12)
    assert not position_5_changes(kind, mlm=False, changed_position=12)
    assert position_5_changes(kind, mlm=False, changed_position=2)


def test_mlm_local_attention_sees_radius_minus_one_positions_on_each_side():
    # radius 4: |i - j| < 4, the causal window i - j < 4 mirrored
    assert position_5_changes("local", mlm=True, changed_position=8)
    assert position_5_changes("local", mlm=True, changed_position=2)
    assert not position_5_changes("local", mlm=True, changed_position=9)
    assert not position_5_changes("local", mlm=True, changed_position=1)
    assert not position_5_changes("local", mlm=False, changed_position=8)


def test_an_mlm_layer_without_attention_sees_only_its_own_token():
    assert not any(position_5_changes("none", mlm=True, changed_position=p) for p in (2, 12))


@pytest.mark.parametrize("kernel", ["blocked", "cudnn"])
def test_mlm_refuses_the_causal_attention_kernels_by_key(kernel):
    config = validate({**VISIBILITY, "mlm_training": True, "attention_kernel": kernel}, "test")
    params = gpt2.init_params(config, jax.random.key(1))
    with pytest.raises(ConfigError, match=rf"key 'attention_kernel' = '{kernel}'.*mlm_training.*auto or plain"):
        gpt2.logits(params, jnp.zeros((1, 16), jnp.int32), config)


@pytest.mark.parametrize("kind,radius", [("global", 4), ("local", 4), ("local", 40), ("gau", 4)])
def test_mlm_attention_flops_count_every_key_each_query_sees_both_ways(kind, radius):
    """MFU's count: q.k and probs.v (2 * width FLOPs each, x3 for the backward) per key a query sees."""
    from models.attention import KINDS

    config = validate({**VISIBILITY, "mlm_training": True, "attention_types": [[[kind], 1]],
                       "local_attention_radius": radius}, "test")
    query, key = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    seen = np.abs(query - key) < radius if kind == "local" else np.ones((16, 16), bool)
    width = config.gau_key_size if kind == "gau" else config.n_embd
    assert KINDS[kind].flops(config) == pytest.approx(12 * width * seen.sum() / 16)


# --- the loss ---------------------------------------------------------------------------------------

LOSS = {"n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_vocab": 64, "train_batch_size": 8,
        "attention_types": [[["global", "local"], 1]], "local_attention_radius": 4, "z_loss": 1e-2,
        "mlm_training": True, "mlm_mask_id": MASK, "mesh_shape": "", "layout": ""}


def masked_batch(rows: int, seed: int = 0, masked_rows_share: bool = False):
    """Random inputs, and labels that are a target at a random ~20% of positions (NOT_PREDICTED
    elsewhere); with masked_rows_share, the first rows hold far more targets than the last."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 64, (rows, 16)).astype(np.int32)
    share = np.linspace(0.6, 0.05, rows)[:, None] if masked_rows_share else 0.2
    targets = rng.random((rows, 16)) < share
    labels = np.where(targets, rng.integers(0, 64, (rows, 16)), NOT_PREDICTED).astype(np.int32)
    return inputs, labels


def test_mlm_loss_is_the_cross_entropy_at_masked_positions_only():
    config = validate(LOSS, "test")
    params = gpt2.init_params(config, jax.random.key(0))
    inputs, labels = masked_batch(4)
    logits = np.asarray(jax.jit(lambda p, t: gpt2.logits(p, t, config))(params, inputs), np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    rows, positions = np.nonzero(labels != NOT_PREDICTED)
    ce = np.mean([log_z[b, t] - logits[b, t, labels[b, t]] for b, t in zip(rows, positions)])
    z = np.mean([log_z[b, t] ** 2 for b, t in zip(rows, positions)])
    accuracy = np.mean([logits[b, t].argmax() == labels[b, t] for b, t in zip(rows, positions)])

    loss, extras = jax.jit(lambda p: model_fns.lm_loss(p, inputs, labels, config, None))(params)
    np.testing.assert_allclose([float(loss), float(extras["cross_entropy"])], [ce + 1e-2 * z, ce], rtol=1e-5)
    masked_accuracy = jax.jit(lambda p: model_fns.masked_lm_loss(p, inputs, labels, config, None)[1]["accuracy"])(params)
    assert float(masked_accuracy) == pytest.approx(accuracy)


def test_mlm_with_entmax_loss_is_the_entmax_loss_at_masked_positions_only():
    from models.entmax import entmax_loss

    config = validate({**LOSS, "entmax_loss": True}, "test")
    params = gpt2.init_params(config, jax.random.key(0))
    inputs, labels = masked_batch(4)
    logits = jax.jit(lambda p, t: gpt2.logits(p, t, config))(params, inputs)
    per_position = np.asarray(entmax_loss(logits, jnp.asarray(np.maximum(labels, 0))))
    expected = per_position[labels != NOT_PREDICTED].mean()  # and no z-loss, as with entmax_loss in a causal LM
    loss, extras = jax.jit(lambda p: model_fns.lm_loss(p, inputs, labels, config, None))(params)
    np.testing.assert_allclose([float(loss), float(extras["cross_entropy"])], [expected, expected], rtol=1e-5)


def test_four_mlm_microbatches_give_the_mean_over_every_masked_position_of_the_batch():
    config = validate({**LOSS, "n_layer": 1, "attention_types": None, "n_embd": 16,
                       "tokens_per_mb_per_replica": 32}, "test")  # 8 rows x 16 tokens on one replica
    layout = build_mesh_layout(config, jax.devices()[:1])
    assert model_fns.microbatch_count(config, layout) == 4
    inputs, labels = (jnp.asarray(x) for x in masked_batch(8, masked_rows_share=True))  # unequal microbatches
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    # the whole batch at once, before the step updates the parameters
    whole_batch = jax.jit(jax.value_and_grad(lambda p: model_fns.lm_loss(p, inputs, labels, config, None)[0]))
    loss, grads = whole_batch(state["params"])
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    _, metrics = model_fns.make_train_step(config, layout, optimizer, shardings)(state, inputs, labels)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)


# --- config errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"mlm_mask_id": None}, r"key 'mlm_mask_id' = .*: mlm_training needs the id of its mask token: an integer in "
                            r"\[0, n_vocab = 64\)"),
    ({"mlm_mask_id": 64}, r"key 'mlm_mask_id' = 64: accepted: an integer in \[0, n_vocab = 64\)"),
    ({"mlm_mask_id": -1}, r"key 'mlm_mask_id' = -1: accepted: an integer in \[0, n_vocab = 64\)"),
    ({"mlm_cls_token_id": 70}, r"key 'mlm_cls_token_id' = 70: accepted: an integer in \[0, n_vocab = 64\)"),
    ({"mlm_cls_token_id": MASK}, r"key 'mlm_cls_token_id' = 3: must differ from mlm_mask_id"),
    ({"mlm_mask_prob": 1.5}, r"key 'mlm_mask_prob' = 1.5: accepted: a number in \[0, 1\]"),
    ({"mlm_same_token_prob": -0.1}, r"key 'mlm_same_token_prob' = -0.1: accepted: a number in \[0, 1\]"),
    ({"mlm_same_token_prob": 0.6, "mlm_random_token_prob": 0.5},
     r"key 'mlm_random_token_prob' = 0.5: plus mlm_same_token_prob = 0.6 exceeds 1"),
    ({"mlm_mask_ignore_ids": [5, 70]}, r"key 'mlm_mask_ignore_ids' = \[5, 70\] \(element 70\): accepted: an integer "
                                       r"in \[0, n_vocab = 64\)"),
], ids=lambda x: next(iter(x)) if isinstance(x, dict) else "")
def test_bad_mlm_keys_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        validate({**LOSS, **change}, "test.json")


def test_mlm_keys_are_not_checked_without_mlm_training():
    assert not validate({**LOSS, "mlm_training": False, "mlm_mask_id": None}, "test").mlm_training


# --- main.py ------------------------------------------------------------------------------------------


def main_py(*args):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
           **SHARED_COMPILATION}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_predict_on_an_mlm_model_is_refused_in_one_line(tmp_path, capsys):
    import main

    model = write_mlm_dataset(tmp_path, model_path=str(tmp_path / "model"))
    assert main.main(["--model", str(model), "--predict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "key 'mlm_training' = True" in err and "fills masks" in err and "not build mask filling" in err


@pytest.mark.slow
def test_gpt_neo_mlm_parameters_train_and_evaluate_through_main_py(tmp_path):
    """GPT-Neo's test_models.py MLM settings (mask id 3, cls id 4, random token share 0.1, shared
    parameters, 2 layers global/local) train, then --eval reports masked-token loss and accuracy."""
    model = write_mlm_dataset(tmp_path, model_path=str(tmp_path / "model"), share_parameters=True,
                              train_steps=4, iterations=2, steps_per_checkpoint=4, eval_steps=2, eval_batch_size=8,
                              lr=3e-3, n_ctx=32, train_batch_size=8)
    trained = main_py("--model", str(model))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    evaluated = main_py("--model", str(model), "--eval")
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    line = next(line for line in evaluated.stdout.splitlines() if "masked-token loss" in line)
    fields = dict(part.strip().rsplit(" ", 1) for part in line.split("|")[1:3])
    loss, accuracy = float(fields["eval masked-token loss"]), float(fields["masked-token accuracy"])
    assert 0 < loss < np.log(N_VOCAB) + 1 and 0 <= accuracy <= 1
    assert f"step 4 | eval loss {loss:.4f}" in trained.stdout  # the same batches, masked alike, while training
    masked = int(line.split("|")[3].split()[0])
    assert 0.1 * 2 * 8 * 32 < masked < 0.2 * 2 * 8 * 32  # ~15% of 2 batches of 8 x 32 positions
