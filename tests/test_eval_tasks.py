"""eval_tasks: LAMBADA's last-word accuracy and perplexity, checked against hand computations on a
real tokenizer, a real LAMBADA-format file and real checkpoints of a training run."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import load_config, validate
from errors import ConfigError
from eval_tasks import ContinuationScorer, TaskEvaluator
from mesh import build_mesh_layout
from models import gpt2
from tests.test_train import TINY, train_tiny_tokenizer, write_dataset

CORPUS = [
    "the cat sat on the mat and the dog slept by the door of the house",
    "a bird flew over the river while the sun went down behind the hills",
    "we walked to the market, bought bread and cheese, and went home to the garden",
] * 20
PASSAGES = [
    "she looked out of the window and saw the",  # ends in " the": the constant model's one guess
    "the dog slept by the door",
    "we went home to the",
    "a bird flew over the river while the sun went down behind the hills and the cat sat on the mat by the",  # > n_ctx
    "they bought bread and cheese at the market",
    "the sun went down behind the hills",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import encoders

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(CORPUS, path, ["<|endoftext|>"])
    return encoders.load_tokenizer(str(path))


def write_lambada(path: Path, passages) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in passages))
    return path


def lambada_config(lambada_path, **changes):
    return validate({**TINY, "n_ctx": 16, "n_vocab": 320, "eval_batch_size": 4, "eval_tasks": ["lambada"],
                     "lambada_path": str(lambada_path), **changes}, "test")


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


def test_lambada_scores_equal_a_hand_computation_for_a_model_that_always_predicts_the(tmp_path, tokenizer):
    """ln_f's gain 0 makes every position's hidden state its bias b, so the model predicts the one
    distribution softmax(wte @ b) everywhere, whatever the passage: a passage is right exactly when
    its last word is the single token it favours (" the"), and its target's log-likelihood is the
    sum of that distribution's log-probabilities over the target's tokens."""
    config = lambada_config(write_lambada(tmp_path / "lambada.jsonl", PASSAGES))
    (the,) = tokenizer.encode(" the")
    params = gpt2.init_params(config, jax.random.key(3))
    wte = np.asarray(params["wte"]).copy()
    wte[the] *= 3.0  # the longest row of the table: wte @ (a multiple of it) peaks there
    params["wte"] = jax.numpy.asarray(wte)
    params["ln_f"] = {"scale": jax.numpy.zeros(config.n_embd), "bias": jax.numpy.asarray(4.0 * wte[the])}
    distribution = log_softmax(wte.astype(np.float64) @ (4.0 * wte[the].astype(np.float64)))
    assert int(np.argmax(distribution)) == the

    targets = [" " + text.rsplit(" ", 1)[1] for text in PASSAGES]
    expected_accuracy = sum(t == " the" for t in targets) / len(PASSAGES)  # 3 of 6
    target_nll = [-sum(distribution[i] for i in tokenizer.encode(t)) for t in targets]
    expected_log_ppl = sum(target_nll) / len(PASSAGES)
    assert len(tokenizer.encode(PASSAGES[3])) > config.n_ctx + 1  # this one is cut to its last n_ctx + 1 tokens
    assert any(len(tokenizer.encode(t)) > 1 for t in targets)  # and some targets span several tokens

    layout = build_mesh_layout(config, jax.devices()[:1])
    scores = TaskEvaluator(config, layout, tokenizer)(params)
    assert scores["lambada_acc"] == pytest.approx(0.5)
    assert scores["lambada_acc"] == pytest.approx(expected_accuracy)
    assert scores["lambada_log_ppl"] == pytest.approx(expected_log_ppl, rel=1e-5)
    assert scores["lambada_ppl"] == pytest.approx(np.exp(expected_log_ppl), rel=1e-5)


def reference_scores(params, config, pairs):
    """Each pair alone, unpadded, through the plain forward: (log-likelihood, greedy) of its continuation."""
    forward = jax.jit(lambda p, tokens: gpt2.logits(p, tokens, config))
    results = []
    for context, continuation in pairs:
        tokens = (list(context) + list(continuation))[-(config.n_ctx + 1):]
        logits = np.asarray(forward(params, np.asarray([tokens[:-1]], np.int32)))[0]
        rows = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
        log_probs = log_softmax(logits)
        results.append((sum(log_probs[r, tokens[r + 1]] for r in rows),
                        all(int(np.argmax(logits[r])) == tokens[r + 1] for r in rows)))
    return results


def test_batched_sharded_scores_equal_each_pair_scored_alone(tokenizer):
    """Batching (longest first, a short last batch), right padding, truncation to n_ctx and a
    sharded mesh leave every continuation's score as the plain forward gives it alone."""
    config = validate({**TINY, "n_ctx": 16, "n_vocab": 320, "mesh_shape": "x:4,y:2", "layout": "batch:x,heads:y"},
                      "test")
    params = gpt2.init_params(config, jax.random.key(1))
    rng = np.random.default_rng(0)
    # unpadded lengths 16 (two cut to their last n_ctx + 1 tokens) and 4: few programs for the reference
    pairs = [(rng.integers(0, 320, n).tolist(), rng.integers(0, 320, m).tolist())
             for n, m in [(3, 2), (20, 2), (1, 4), (12, 5), (4, 1)]]
    # a continuation the model's greedy choices make: the greedy flag must be true there
    context = rng.integers(0, 320, 4).tolist()
    greedy = [int(np.argmax(np.asarray(gpt2.logits(params, np.asarray([context], np.int32), config))[0, -1]))]
    pairs.append((context, greedy))
    expected = reference_scores(params, config, pairs)
    assert expected[-1][1]

    sharded = ContinuationScorer(config, build_mesh_layout(config), batch_size=4).score(params, pairs)
    np.testing.assert_allclose([s for s, _ in sharded], [s for s, _ in expected], rtol=1e-5)
    assert [g for _, g in sharded] == [g for _, g in expected]


def test_a_missing_or_malformed_lambada_file_is_one_clear_error(tmp_path, tokenizer):
    layout = build_mesh_layout(lambada_config("x"), jax.devices()[:1])
    missing = tmp_path / "nowhere" / "lambada_test.jsonl"
    with pytest.raises(ConfigError, match=r"key 'lambada_path' = '.*nowhere/lambada_test.jsonl': no such file.*"
                                          r"lambada_test.jsonl.*never downloads"):
        TaskEvaluator(lambada_config(missing), layout, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one two"}) + "\n" + json.dumps({"passage": "three four"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2 is not a JSON object with a \"text\" field"):
        TaskEvaluator(lambada_config(bad), layout, tokenizer)
    with pytest.raises(ConfigError, match=r"line 1: the passage has no space"):
        TaskEvaluator(lambada_config(write_lambada(tmp_path / "one.jsonl", ["word"])), layout, tokenizer)
    with pytest.raises(ConfigError, match=r"key 'n_vocab' = 64: the tokenizer gives id \d+"):
        TaskEvaluator(lambada_config(write_lambada(tmp_path / "l.jsonl", PASSAGES), n_vocab=64), layout, tokenizer)


@pytest.mark.slow
def test_training_logs_lambada_at_every_checkpoint_to_metrics_and_tensorboard(tmp_path, tokenizer):
    import train
    from checkpoints import restore_params

    model_config = write_dataset(tmp_path / "data", n_vocab=256)
    dataset_config = tmp_path / "data" / "dataset_configs" / "tiny.json"
    tokenizer_file = tmp_path / "tokenizer.json"
    train_tiny_tokenizer(CORPUS, tokenizer_file, ["<|endoftext|>"])
    dataset_config.write_text(json.dumps({**json.loads(dataset_config.read_text()), "n_vocab": 320,
                                          "tokenizer_path": str(tokenizer_file)}))
    lambada = write_lambada(tmp_path / "lambada.jsonl", PASSAGES)
    model_path = tmp_path / "run"
    config = load_config(str(model_config), [f"model_path={model_path}", "n_vocab=320", "eval_steps=0",
                                             "train_steps=4", "steps_per_checkpoint=2", "n_layer=1", 'attention_types=[[["local"], 1]]',
                                             "n_ctx=16", "n_embd=32", "n_head=2", "train_batch_size=2",
                                             "eval_batch_size=2", "embed_dropout=0", "res_dropout=0", 'eval_tasks=["lambada"]', f"lambada_path={lambada}"])
    layout = build_mesh_layout(config, jax.devices()[:1])
    result = train.run(config, layout=layout)
    assert result.step == 4

    rows = [json.loads(line) for line in (model_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "lambada_acc" in r}
    assert sorted(logged) == [2, 4]
    evaluator = TaskEvaluator(config, layout)
    for step in (2, 4):  # each checkpoint's own scores, as --eval's evaluator gives them
        again = evaluator(restore_params(config, layout, step)[0])
        for name in ("lambada_acc", "lambada_log_ppl", "lambada_ppl"):
            assert logged[step][name] == pytest.approx(again[name], rel=1e-5)
    assert logged[2]["lambada_log_ppl"] != logged[4]["lambada_log_ppl"]
    evaluated = train.evaluate(config, layout)  # --eval: the newest checkpoint's
    assert evaluated["step"] == 4 and evaluated["lambada_acc"] == pytest.approx(logged[4]["lambada_acc"])
    assert evaluated["lambada_log_ppl"] == pytest.approx(logged[4]["lambada_log_ppl"], rel=1e-5)

    assert scalar_steps(model_path / "tensorboard", "lambada_acc") == [2, 4]


def scalar_steps(folder: Path, tag: str) -> list[int]:
    """The steps of a scalar in a TensorBoard events file, read frame by frame (length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    (events_file,) = folder.glob("events.out.tfevents.*")
    data, steps, at = events_file.read_bytes(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 8], "little")
        event = Event.FromString(data[at + 12:at + 12 + length])
        at += 16 + length
        steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps
