"""Vocabulary pruning (vocab_pruning.py, `export.py --prune_vocab`): a byte-level BPE trained here by
data/train_tokenizer.py on a broad corpus of 120 words, pruned to a corpus (a .txt and a .jsonl)
that uses 12 of them; a tiny model trained a few steps, pruned, compared with the original's logits
restricted to the kept rows, and exported to Hugging Face."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export import hf_logits, load_hf, save_checkpoint

import export
import vocab_pruning
from checkpoints import restore_params
from configs import load_config
from data import train_tokenizer
from encoders import _byte_level_alphabet, load_dataset_tokenizer, load_tokenizer
from errors import DataError
from mesh import build_mesh_layout
from models import gpt2

N_CTX = 32
PADDED_VOCAB = 768  # above the tokenizer's 700: rows no token encodes to, which pruning drops
TINY = {"n_ctx": N_CTX, "n_embd": 32, "n_head": 4, "n_layer": 1, "attention_types": [[["global"], 1]],
        "mesh_shape": "", "layout": ""}
OUTSIDE_TEXT = "zzqx never seen ﬁ 😀 naïve\ttabs 2048\n<|endoftext|> and more"  # no word of the kept corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """(folder, tokenizer file, kept corpus folder, kept documents)."""
    folder = tmp_path_factory.mktemp("prune")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(120)]
    broad = folder / "broad"
    broad.mkdir()
    for i in range(4):
        (broad / f"part{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(30)) + "."
                                                      for _ in range(40)))
    few = words[:12]
    kept = folder / "kept"
    kept.mkdir()
    documents = [" ".join(rng.choice(few) for _ in range(200))]
    documents += [" ".join(rng.choice(few) for _ in range(20)) + ", 42!" for _ in range(20)]
    (kept / "story.txt").write_text(documents[0])
    (kept / "lines.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[1:]))
    tokenizer_file = train_tokenizer.main(["--base_dir", str(broad), "--output_dir", str(folder / "tok"),
                                           "--vocab_size", "700"])
    return folder, tokenizer_file, kept, documents


@pytest.fixture(scope="module")
def pruned_tokenizer(corpora):
    _, tokenizer_file, kept, _ = corpora
    old = load_tokenizer(str(tokenizer_file))
    new, kept_ids = vocab_pruning.prune_tokenizer(old, str(kept), old.vocab_size)
    return old, new, kept_ids


def test_kept_corpus_encodes_to_the_old_ids_renumbered_and_decodes_back(corpora, pruned_tokenizer):
    _, _, _, documents = corpora
    old, new, kept_ids = pruned_tokenizer
    old_to_new = {int(old_id): new_id for new_id, old_id in enumerate(kept_ids)}
    assert old.vocab_size == 700 and new.vocab_size == len(kept_ids) < old.vocab_size // 2
    for document in documents:
        old_ids = old.encode(document)
        expected = [old_to_new[i] for i in old_ids]
        assert new.encode(document) == expected
        assert new.tokenizer.encode(document, add_special_tokens=False).ids == expected  # tokenizers, not tiktoken
        assert new.decode(expected) == old.decode(old_ids) == " " + document  # the prefix space BPE adds
    assert new.fast is not None  # still a byte-level BPE the fast encoder reproduces


def test_kept_tokens_keep_their_strings_and_order_the_specials_and_every_byte(corpora, pruned_tokenizer):
    _, _, _, documents = corpora
    old, new, kept_ids = pruned_tokenizer
    assert list(kept_ids) == sorted(kept_ids)
    for new_id, old_id in enumerate(kept_ids):
        assert new.tokenizer.id_to_token(new_id) == old.tokenizer.id_to_token(int(old_id))
    assert [new.tokenizer.id_to_token(i) for i in (0, 1)] == ["<|endoftext|>", "<|padding|>"] and new.eos_id == 0
    vocabulary = new.tokenizer.get_vocab()
    assert all(char in vocabulary for char in _byte_level_alphabet())
    used = {i for document in documents for i in old.encode(document)}
    bytes_and_specials = {old.tokenizer.token_to_id(char) for char in _byte_level_alphabet()} | {0, 1}
    # BPE reaches some kept tokens through tokens no encoding of the corpus holds: those are kept too
    assert len(kept_ids) > len(used | bytes_and_specials)


def test_any_text_still_encodes_in_more_tokens(pruned_tokenizer):
    old, new, _ = pruned_tokenizer
    new_ids = new.encode(OUTSIDE_TEXT)
    assert new.decode(new_ids) == old.decode(old.encode(OUTSIDE_TEXT))
    assert len(new_ids) > len(old.encode(OUTSIDE_TEXT))
    assert new.tokenizer.encode(OUTSIDE_TEXT, add_special_tokens=False).ids == new_ids


def test_keep_from_a_tokenizer_keeps_the_tokens_both_hold(corpora):
    folder, tokenizer_file, kept, documents = corpora
    small = train_tokenizer.main(["--base_dir", str(kept), "--output_dir", str(folder / "small-tok"),
                                  "--file_type", "jsonl", "--vocab_size", "300"])
    old = load_tokenizer(str(tokenizer_file))
    new, _ = vocab_pruning.prune_tokenizer(old, str(small), old.vocab_size)
    both = set(old.tokenizer.get_vocab()) & set(load_tokenizer(str(small)).tokenizer.get_vocab())
    assert both <= set(new.tokenizer.get_vocab()) <= set(old.tokenizer.get_vocab())
    assert new.vocab_size < old.vocab_size
    for document in documents[1:]:  # what the small tokenizer learned from
        assert new.decode(new.encode(document)) == old.decode(old.encode(document))


def write_model_config(folder, tokenizer_file, name: str, **overrides):
    datasets = folder / "configs" / "dataset_configs"
    datasets.mkdir(parents=True, exist_ok=True)
    (datasets / f"{name}.json").write_text(json.dumps({"path": str(folder / "no-shards" / "*.tfrecords"),
                                                       "tokenizer_path": str(tokenizer_file), "eos_id": 0,
                                                       "padding_id": 1, "n_vocab": PADDED_VOCAB}))
    path = folder / "configs" / f"{name}.json"
    path.write_text(json.dumps({**TINY, "n_vocab": PADDED_VOCAB, "model_path": str(folder / name),
                                "datasets": [[name, 2, "documents_random", 1.0]], **overrides}))
    return path


def restore(config):
    return restore_params(config, build_mesh_layout(config, jax.devices()[:1]))


def logits(params, config, tokens):
    return np.asarray(jax.jit(lambda p, t: gpt2.logits(p, t, config))(params, jnp.asarray(tokens)))


def kept_text_tokens(tokenizer, documents):
    """Two rows of N_CTX ids of the kept corpus."""
    ids = [i for document in documents for i in tokenizer.encode(document)]
    return np.asarray([ids[:N_CTX], ids[N_CTX:2 * N_CTX]])


def random_params(config, seed: int):
    """Every weight random (made in numpy, so nothing compiles): biases and norms not zeros and ones."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: jnp.asarray(rng.normal(0, 0.1, gpt2.shape_of(w, config)), jnp.float32),
                        gpt2.weights(config), is_leaf=gpt2.is_weight)


def trained(config, batches, learning_rate: float = 0.5):
    """A few steps of plain gradient descent on next-token cross-entropy, from random weights."""
    def loss(params, batch):
        log_probs = jax.nn.log_softmax(gpt2.logits(params, batch[:, :-1], config))
        return -jnp.mean(jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1))

    step = jax.jit(lambda params, batch: jax.tree.map(lambda p, g: p - learning_rate * g, params,
                                                      jax.grad(loss)(params, batch)))
    params = random_params(config, seed=3)
    losses = [float(loss(params, jnp.asarray(batches[0])))]
    for batch in batches:
        params = step(params, jnp.asarray(batch))
    losses.append(float(loss(params, jnp.asarray(batches[0]))))
    assert losses[1] < losses[0]  # it learned something of the kept corpus
    return params


@pytest.fixture(scope="module")
def pruned_model(corpora):
    """A model trained 3 steps on the kept corpus's ids, then `export.py --prune_vocab` of it."""
    folder, tokenizer_file, kept, documents = corpora
    config = load_config(str(write_model_config(folder, tokenizer_file, "trained")))
    ids = np.asarray([i for d in documents for i in load_dataset_tokenizer(config).encode(d)])
    windows = ids[: (len(ids) // (N_CTX + 1)) * (N_CTX + 1)].reshape(-1, N_CTX + 1)
    params = trained(config, [windows[step * 4:(step + 1) * 4] for step in range(3)])
    save_checkpoint(config, params, step=3)
    config_out = folder / "configs" / "pruned.json"
    assert export.main(["--model", config.source, "--prune_vocab", "--keep_from", str(kept),
                        "--model_path", str(folder / "pruned"), "--config_out", str(config_out)]) == 0
    return config, params, load_config(str(config_out)), documents


def test_pruned_logits_are_the_originals_at_the_kept_rows(pruned_model):
    config, params, pruned_config, documents = pruned_model
    pruned_params, step = restore(pruned_config)
    assert step == 0
    old, new = load_dataset_tokenizer(config), load_dataset_tokenizer(pruned_config)
    saved = json.loads((Path(pruned_config.model_path) / "vocab_map.json").read_text())
    old_to_new = {int(k): v for k, v in saved["old_to_new"].items()}
    kept_ids = sorted(old_to_new, key=old_to_new.get)
    assert saved["old_n_vocab"] == PADDED_VOCAB and pruned_config.n_vocab == len(kept_ids) == new.vocab_size
    for old_id, new_id in old_to_new.items():
        assert new.tokenizer.id_to_token(new_id) == old.tokenizer.id_to_token(old_id)
    tokens = kept_text_tokens(old, documents)
    renumbered = np.vectorize(old_to_new.get)(tokens)
    assert np.array_equal(renumbered, kept_text_tokens(new, documents))
    ours, original = logits(pruned_params, pruned_config, renumbered), logits(params, config, tokens)
    assert ours.shape == (2, N_CTX, len(kept_ids))
    np.testing.assert_allclose(ours, original[..., kept_ids], rtol=0, atol=1e-5)
    assert pruned_config.eos_id == new.eos_id == 0 and pruned_config.padding_id == 1


def test_hf_export_of_the_pruned_model_loads_and_gives_its_logits(pruned_model, tmp_path):
    import transformers

    _, _, pruned_config, documents = pruned_model
    pruned_params, _ = restore(pruned_config)
    out = export.export_to_hf(pruned_config, tmp_path / "hf")
    model, info, warnings = load_hf(out)
    assert not any(info.values()) and warnings == []
    new = load_dataset_tokenizer(pruned_config)
    tokens = kept_text_tokens(new, documents)
    theirs = hf_logits(model, tokens)
    assert theirs.shape == (2, N_CTX, pruned_config.n_vocab)
    assert np.max(np.abs(theirs - logits(pruned_params, pruned_config, tokens))) <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).encode(documents[1]) == new.encode(documents[1])


def test_an_untied_output_projection_keeps_its_rows_and_bias_and_every_id_a_key_names(corpora):
    """padding_id names a padded row (past the tokenizer) and mlm_mask_id a token the corpus never uses:
    both rows are kept, renumbered in order, the padded one last."""
    folder, tokenizer_file, kept, documents = corpora
    old_tokenizer = load_tokenizer(str(tokenizer_file))
    unused = old_tokenizer.vocab_size - 1  # the last merge's token: a word of the broad corpus only
    assert unused not in {i for document in documents for i in old_tokenizer.encode(document)}
    config = load_config(str(write_model_config(folder, tokenizer_file, "untied", no_weight_tie=True,
                                                padding_id=PADDED_VOCAB - 2, mlm_mask_id=unused)))
    params = random_params(config, seed=5)
    save_checkpoint(config, params, step=1)
    pruned_config = vocab_pruning.prune_vocab(config, str(kept), str(folder / "untied-pruned"),
                                              folder / "configs" / "untied_pruned.json")
    pruned_params, _ = restore(pruned_config)
    new = load_dataset_tokenizer(pruned_config)
    saved = json.loads((folder / "untied-pruned" / "vocab_map.json").read_text())["old_to_new"]
    kept_ids = sorted((int(old) for old in saved), key=lambda old: saved[str(old)])
    assert kept_ids == sorted(kept_ids) and kept_ids[-1] == PADDED_VOCAB - 2 and unused in kept_ids
    assert pruned_config.n_vocab == new.vocab_size + 1 and pruned_config.padding_id == pruned_config.n_vocab - 1
    assert new.tokenizer.id_to_token(pruned_config.mlm_mask_id) == old_tokenizer.tokenizer.id_to_token(unused)
    tokens = kept_text_tokens(old_tokenizer, documents)
    np.testing.assert_allclose(logits(pruned_params, pruned_config, kept_text_tokens(new, documents)),
                               logits(params, config, tokens)[..., kept_ids], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pruned_params["lm_head"]["bias"], np.asarray(params["lm_head"]["bias"])[kept_ids])


def run_cli(args, capsys):
    code = export.main(args)
    err = capsys.readouterr().err
    return code, err


def test_a_missing_keep_from_is_one_error_line(corpora, capsys, tmp_path):
    folder, tokenizer_file, _, _ = corpora
    path = write_model_config(folder, tokenizer_file, "unpruned")
    code, err = run_cli(["--model", str(path), "--prune_vocab", "--keep_from", str(tmp_path / "nowhere"),
                         "--model_path", str(tmp_path / "out"), "--config_out", str(tmp_path / "c.json")], capsys)
    assert code == 2 and err.startswith("error: --keep_from ") and "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.json").exists()


def test_a_corpus_file_that_is_not_utf8_is_named(corpora, tmp_path):
    _, tokenizer_file, _, documents = corpora
    (tmp_path / "good.txt").write_text(documents[0])
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    old = load_tokenizer(str(tokenizer_file))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(byte 2 is 0xef\); --keep_from reads"):
        vocab_pruning.prune_tokenizer(old, str(tmp_path), old.vocab_size)


def test_a_tokenizer_that_is_not_a_byte_level_bpe_is_refused_by_name(corpora, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder, _, kept, documents = corpora
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(documents, trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    wordpiece.save(str(tmp_path / "wordpiece.tokenizer.json"))
    path = write_model_config(folder, tmp_path / "wordpiece.tokenizer.json", "wordpiece")
    code, err = run_cli(["--model", str(path), "--prune_vocab", "--keep_from", str(kept),
                         "--model_path", str(tmp_path / "out"), "--config_out", str(tmp_path / "c.json")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "wordpiece.tokenizer.json" in err and "'WordPiece'" in err and "byte-level BPE" in err
    assert not (tmp_path / "out").exists()
