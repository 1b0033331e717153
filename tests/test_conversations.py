"""Conversation SFT: Firefly-format jsonl -> records with a target mask -> rows whose labels score
the assistant's tokens only -> the target-masked loss, training, resuming and --predict as the
assistant. A real tokenizer trained on the vendored sample, real shards in temp dirs throughout."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import independent_feature, independent_read
from test_train import final_params, logged, train_in_process

import model_fns
from configs import load_config
from data import create_tfrecords, train_tokenizer
from encoders import load_tokenizer
from errors import ConfigError, DataError
from inputs import Sampler
from mesh import build_mesh_layout
from models import gpt2
from optimizers import make_optimizer
from tfrecord import MaskedRecord, ShardReader, write_shard

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "samples" / "firefly_conversations.jsonl"
EOS, PAD = 0, 1  # train_tokenizer's <|endoftext|> and <|padding|>
N_VOCAB, N_CTX, BATCH = 400, 32, 8
MODEL = {"n_ctx": N_CTX, "n_embd": 32, "n_head": 2, "n_layer": 1, "n_vocab": N_VOCAB, "train_batch_size": BATCH,
         "datasets": [["chat", 1, "conversations", 1.0]], "mesh_shape": "", "layout": "", "lr": 1e-3,
         "warmup_steps": 1, "lr_decay_end": 10, "predict_max_steps": 6, "predict_batch_size": 1}


def sample_turns() -> list[list[tuple[str, str]]]:
    """The vendored sample's conversations, read here straight from the jsonl."""
    return [[(t["human"], t["assistant"]) for t in json.loads(line)["conversation"]]
            for line in SAMPLE.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("chat_corpus")
    text = "".join(f"Human: {h}\nAssistant: {a}\n" for turns in sample_turns() for h, a in turns)
    (corpus / "chat.txt").write_text(text * 5)
    return train_tokenizer.main(["--base_dir", str(corpus), "--output_dir", str(tmp_path_factory.mktemp("chat_tok")),
                                 "--file_type", "txt", "--vocab_size", str(N_VOCAB)])


def make_chat_shards(input_dir: Path, tokenizer_path: Path, root: Path, *flags: str) -> list[Path]:
    return create_tfrecords.main(["--input_dir", str(input_dir), "--mode", "conversations", "--name", "chat",
                                  "--encoder_path", str(tokenizer_path), "--output_dir", str(root / "shards"),
                                  "--processes", "1", "--quiet", "--write_dataset_config",
                                  "--dataset_config_dir", str(root / "dataset_configs"), *flags])


@pytest.fixture(scope="module")
def chat(tokenizer_path, tmp_path_factory) -> Path:
    """A folder holding the sample's shards (3 conversations a shard), their dataset config and a model config."""
    root = tmp_path_factory.mktemp("chat")
    make_chat_shards(SAMPLE.parent, tokenizer_path, root, "--files_per", "3")
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def records(shards: Path) -> list[MaskedRecord]:
    return [ShardReader(str(p)).read_conversation(i) for p in sorted(shards.glob("*.tfrecords"))
            for i in range(len(ShardReader(str(p))))]


def runs(mask: np.ndarray, value: int) -> list[slice]:
    """The maximal runs of `value` in a 0/1 mask, as slices."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (mask == value).astype(int), [0]])))
    return [slice(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


# --- the records -------------------------------------------------------------------------------------


def test_the_target_mask_decodes_back_to_exactly_the_assistant_turns(chat, tokenizer_path):
    tokenizer = load_tokenizer(str(tokenizer_path))
    conversations = sample_turns()
    written = records(chat / "shards")
    assert len(written) == len(conversations)
    for (ids, mask), turns in zip(written, conversations):
        answers, contexts = runs(mask, 1), runs(mask, 0)
        assert len(answers) == len(contexts) == len(turns)
        for answer, context, (human, assistant) in zip(answers, contexts, turns):
            assert context.stop == answer.start
            # the tokenizer adds a prefix space to every piece it encodes
            assert tokenizer.decode(ids[answer]) == f" {assistant}<|endoftext|>"
            assert tokenizer.decode(ids[context]) == f" Human: {human}\nAssistant:"


def test_a_conversation_record_keeps_text_for_plain_readers_and_its_mask_in_a_second_feature(chat):
    shard = sorted((chat / "shards").glob("*.tfrecords"))[0]
    plain = independent_read(shard)  # a reader that knows only the `text` feature
    blob, pos = shard.read_bytes(), 0
    for ids, mask in records(chat / "shards")[:len(plain)]:
        assert plain.pop(0) == ids.tolist()
        length = int.from_bytes(blob[pos:pos + 8], "little")
        data = blob[pos + 12:pos + 12 + length]
        pos += 16 + length
        assert independent_feature(data, b"target_mask") == mask.tolist()
        assert len(mask) == len(ids) and set(mask.tolist()) == {0, 1}


# --- rows, labels and the loss ------------------------------------------------------------------------


def chat_config(root: Path, **overrides):
    return load_config(str(root / "model.json"), [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def record_of_row(row_inputs: np.ndarray, written: list[MaskedRecord]) -> MaskedRecord:
    """The conversation a row holds: the one record whose tokens the row starts with."""
    found = [r for r in written if np.array_equal(r.text[:N_CTX][:len(row_inputs)], row_inputs[:len(r.text[:N_CTX])])]
    assert len(found) == 1
    return found[0]


def hand_loss(logits: np.ndarray, inputs: np.ndarray, written: list[MaskedRecord]) -> tuple[float, int]:
    """Mean cross-entropy over the positions whose next token is an assistant token, in numpy,
    from the records themselves; and the number of those positions."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    losses = []
    for row, row_inputs in enumerate(inputs):
        ids, mask = record_of_row(row_inputs, written)
        for t in range(min(N_CTX, len(ids) - 1)):
            if mask[t + 1] == 1:
                losses.append(-log_probs[row, t, ids[t + 1]])
    return float(np.mean(losses)), len(losses)


def test_rows_score_exactly_the_next_assistant_tokens_and_padding_never(chat):
    sampler = Sampler(chat_config(chat))
    written = records(chat / "shards")
    inputs, labels = sampler.inputs_and_labels(0, range(BATCH), BATCH)
    for row_inputs, row_labels in zip(inputs, labels):
        ids, mask = record_of_row(row_inputs, written)
        padded = np.concatenate([ids, np.full(N_CTX + 1, PAD)])[:N_CTX + 1]
        target = np.concatenate([mask, np.zeros(N_CTX + 1, int)])[:N_CTX + 1]
        np.testing.assert_array_equal(row_inputs, padded[:-1])
        np.testing.assert_array_equal(row_labels, np.where(target[1:] == 1, padded[1:], -1))
    assert (labels == -1).any() and (labels != -1).any()


def test_the_loss_is_the_mean_over_target_positions_on_one_device_and_sharded_with_microbatches(chat):
    config = chat_config(chat, tokens_per_mb_per_replica=N_CTX)
    written = records(chat / "shards")
    inputs, labels = (jnp.asarray(x) for x in Sampler(config).inputs_and_labels(0, range(BATCH), BATCH))
    # 4 batch replicas, 2 microbatches each: the train step's loss is still the mean over every target
    sharded = config.replace(mesh_shape="x:4", layout="batch:x")
    layout = build_mesh_layout(sharded, jax.devices()[:4])
    assert model_fns.microbatch_count(sharded, layout) == 2
    optimizer = make_optimizer(sharded)
    shardings = model_fns.state_shardings(sharded, layout, optimizer)
    state = model_fns.init_state(sharded, layout, optimizer, shardings)
    params = jax.device_get(state["params"])
    one_device = build_mesh_layout(config, jax.devices()[:1])
    logits, cross_entropy = jax.jit(lambda p: (gpt2.logits(p, inputs, config), model_fns.lm_loss(
        p, inputs, labels, config, one_device)[1]["cross_entropy"]))(params)
    expected, scored = hand_loss(np.asarray(logits), np.asarray(inputs), written)
    assert 0 < scored < inputs.size
    assert float(cross_entropy) == pytest.approx(expected, rel=1e-5)
    _, metrics = model_fns.make_train_step(sharded, layout, optimizer, shardings)(state, inputs, labels)
    assert float(metrics["cross_entropy"]) == pytest.approx(expected, rel=1e-5)


def test_changing_a_human_turn_changes_the_inputs_not_which_positions_are_scored(chat, tokenizer_path, tmp_path):
    tokenizer = load_tokenizer(str(tokenizer_path))
    lines = SAMPLE.read_text().splitlines()
    values = json.loads(lines[3])
    question = values["conversation"][0]["human"]  # "Why is the sky blue?"
    length = len(tokenizer.encode(f"Human: {question}\nAssistant:"))
    # another question of as many tokens, so that every later position stays where it was
    other = next(q for q in ("Why is the sea green?", "Why is the grass green?", "Why are the clouds white?",
                             "Why is snow white?", "How is the sky blue?")
                 if len(tokenizer.encode(f"Human: {q}\nAssistant:")) == length and q != question)
    values["conversation"][0]["human"] = other
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "chats.jsonl").write_text("\n".join([*lines[:3], json.dumps(values), *lines[4:]]) + "\n")
    make_chat_shards(corpus, tokenizer_path, tmp_path, "--files_per", "3")
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    inputs, labels = Sampler(chat_config(chat)).inputs_and_labels(1, range(BATCH), BATCH)
    new_inputs, new_labels = Sampler(chat_config(tmp_path)).inputs_and_labels(1, range(BATCH), BATCH)
    changed_rows = np.flatnonzero((inputs != new_inputs).any(axis=1))
    assert len(changed_rows) == 1
    np.testing.assert_array_equal(new_labels != -1, labels != -1)
    np.testing.assert_array_equal(new_labels, labels)  # the assistant's tokens, the same


# --- training, resuming, sampling as the assistant ----------------------------------------------------


def test_training_resumes_exactly_and_predict_continues_a_conversation_as_the_assistant(chat, tokenizer_path, tmp_path):
    import sample

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    model = chat / "model.json"
    train_in_process(model, straight, "train_steps=4", "steps_per_checkpoint=2", "iterations=2")
    train_in_process(model, resumed, "train_steps=2", "steps_per_checkpoint=2", "iterations=2")
    result = train_in_process(model, resumed, "train_steps=4", "steps_per_checkpoint=2", "iterations=2")
    assert (result.start_step, result.step) == (2, 4)
    assert logged(straight, "loss")[4] == logged(resumed, "loss")[4]
    (params_a, step_a), (params_b, step_b) = final_params(straight, model), final_params(resumed, model)
    assert step_a == step_b == 4
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    tokenizer = load_tokenizer(str(tokenizer_path))
    config = chat_config(chat, model_path=str(straight))
    turns = sample_turns()[2]  # three turns: the prompt holds two answered ones and the third question
    prompt_line = json.dumps({"conversation": [{"human": h, "assistant": a} for h, a in turns[:-1]]
                              + [{"human": turns[-1][0]}]})
    prompt = sample.encode_prompt(config, prompt_line, tokenizer, "test")
    ids, mask = records(chat / "shards")[2]
    last_answer = runs(mask, 1)[-1]
    assert prompt == ids[:last_answer.start].tolist()  # as training rendered it, up to the third answer
    assert tokenizer.decode(prompt).endswith("\nAssistant:")
    prompt_file = tmp_path / "prompt.jsonl"
    prompt_file.write_text(prompt_line + "\n")
    written = Path(sample.run_predict(config, build_mesh_layout(config, jax.devices()[:1]), str(prompt_file)))
    assert f"Human: {turns[-1][0]}\nAssistant:" in written.read_text()


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("line,what", [
    ('{"conversation_id": 9, "conversation": [{"human": "hi"}]}', r"turn 0 of \"conversation\""),
    ('{"conversation_id": 9, "text": "hi"}', r"no \"conversation\" list"),
    ('{"conversation": [{"human": "hi", "assistant": "yo"}', "not JSON"),
])
def test_a_malformed_line_is_one_error_naming_the_file_and_line(tokenizer_path, tmp_path, line, what):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = SAMPLE.read_text().splitlines()[0]
    (corpus / "chats.jsonl").write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataError, match=rf"chats.jsonl: line 3: {what}.*expected a JSON object with \"conversation\""):
        make_chat_shards(corpus, tokenizer_path, tmp_path)


def test_conversations_mode_refuses_plain_shards_stitch_and_mlm(chat, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_shard(str(plain / "p_0_2.tfrecords"), [[5, 6, 7], [8, 9]])
    values = json.loads((chat / "dataset_configs" / "chat.json").read_text()) | {"path": str(plain / "*.tfrecords")}
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "chat.json").write_text(json.dumps(values))
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    with pytest.raises(DataError, match=r"p_0_2.tfrecords: record at byte offset 0 is not a conversation's .*"
                                        r"no feature 'target_mask'"):
        Sampler(chat_config(tmp_path))
    with pytest.raises(ConfigError, match="stitch must be 1 in conversations mode"):
        chat_config(chat, datasets=[["chat", 2, "conversations", 1.0]])
    with pytest.raises(ConfigError, match="key 'datasets'.*mlm_training"):
        chat_config(chat, mlm_training=True, mlm_mask_id=3)
    import sample

    answered = json.dumps({"conversation": [{"human": "hi", "assistant": "done"}]})
    with pytest.raises(DataError, match="p.jsonl: the last turn of a prompt holds an assistant text"):
        sample.conversation_turns(answered, "p.jsonl")
    assert sample.conversation_turns("Plain text, not JSON", "p.txt") is None


def test_an_interrupted_conversation_writer_resumes_to_the_uninterrupted_shards(tokenizer_path, tmp_path):
    """A bad line stops the writer after some shards, with conversations read but not yet written; the
    line fixed in place (same size), the rerun continues to exactly the shards of a run on the good file."""
    lines = SAMPLE.read_text().splitlines() * 9  # 72 conversations: past one encoding task of 64
    bad = '{"conversation": 7}'
    fixed = lines[69]
    bad = bad + " " * (len(fixed) - len(bad))
    for name, line in (("good", fixed), ("interrupted", bad)):
        (tmp_path / name / "corpus").mkdir(parents=True)
        (tmp_path / name / "corpus" / "chats.jsonl").write_text("\n".join([*lines[:69], line, *lines[70:]]) + "\n")
    expected = make_chat_shards(tmp_path / "good" / "corpus", tokenizer_path, tmp_path / "good", "--files_per", "10")
    interrupted = tmp_path / "interrupted"
    with pytest.raises(DataError, match="line 70"):
        make_chat_shards(interrupted / "corpus", tokenizer_path, interrupted, "--files_per", "10")
    assert len(list((interrupted / "shards").glob("*.tfrecords"))) == 6  # 60 written, 4 pending in the progress file
    (interrupted / "corpus" / "chats.jsonl").write_text("\n".join(lines) + "\n")
    make_chat_shards(interrupted / "corpus", tokenizer_path, interrupted, "--files_per", "10")
    assert {p.name: p.read_bytes() for p in (interrupted / "shards").glob("*.tfrecords")} == \
        {Path(p).name: Path(p).read_bytes() for p in expected}
