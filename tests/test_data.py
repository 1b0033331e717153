"""The data path: text -> tokenizer -> TFRecord shards -> sampled batches.

Real parts throughout: a byte-level BPE trained here on a few KB of the standard library's
sources, shards written by data/create_tfrecords.py into a temp dir, and an independent
TFRecord reader/writer (the published record format, protobuf encoded by hand) to check that
our shards are the format GPT-Neo and TensorFlow read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags

from configs import load_config
from data import create_tfrecords, train_tokenizer
from encoders import load_tokenizer
from errors import ConfigError, DataError
from inputs import Sampler, check_dataset
from tfrecord import read_shard, write_shard

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCE_MODULES = ["bisect.py", "colorsys.py", "keyword.py", "this.py", "glob.py", "fnmatch.py", "stat.py"]


# --- an independent TFRecord implementation (from the published format, not from tfrecord.py) ---

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def _delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def independent_example(ids: list[int]) -> bytes:
    int64_list = _delimited(1, b"".join(_varint(i) for i in ids))
    entry = _delimited(1, b"text") + _delimited(2, _delimited(3, int64_list))
    return _delimited(1, _delimited(1, entry))


def independent_write(path: Path, examples: list[list[int]]) -> None:
    with open(path, "wb") as f:
        for ids in examples:
            data = independent_example(ids)
            length = struct.pack("<Q", len(data))
            f.write(length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data)))


def independent_read(path: Path) -> list[list[int]]:
    blob, pos, examples = path.read_bytes(), 0, []
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        assert struct.unpack_from("<I", blob, pos + 8)[0] == _masked(blob[pos:pos + 8])
        data = blob[pos + 12:pos + 12 + length]
        assert struct.unpack_from("<I", blob, pos + 12 + length)[0] == _masked(data)
        pos += 16 + length
        examples.append(independent_feature(data, b"text"))
    return examples


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (data[pos] & 0x7F) << shift
        shift += 7
        pos += 1
        if data[pos - 1] < 0x80:
            return value, pos


def _submessages(data: bytes) -> dict[int, list[bytes]]:
    fields, pos = {}, 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        assert tag & 7 == 2, "only length-delimited fields expected"
        size, pos = _read_varint(data, pos)
        fields.setdefault(tag >> 3, []).append(data[pos:pos + size])
        pos += size
    return fields


def independent_feature(example: bytes, name: bytes) -> list[int]:
    """The int64 feature `name` of a serialized Example, parsed from the published protobuf layout."""
    for entry in _submessages(_submessages(example)[1][0])[1]:
        parts = _submessages(entry)
        if parts[1][0] == name:
            packed = _submessages(_submessages(parts[2][0])[3][0])[1][0]
            values, pos = [], 0
            while pos < len(packed):
                value, pos = _read_varint(packed, pos)
                values.append(value)
            return values
    raise AssertionError(f"no feature {name!r}")


# --- fixtures: a corpus, a tokenizer trained on it, configs ------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few KB of real text: standard-library modules as .txt files, and two as a multi-document jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [(STDLIB / name).read_text() for name in SOURCE_MODULES]
    for name, text in zip(SOURCE_MODULES[:5], texts[:5]):
        (root / f"{name}.txt").write_text(text)
    with open(root / "zz_archive.jsonl", "w") as f:
        for text in texts[5:]:
            f.write(json.dumps({"text": text, "meta": {}}) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus_documents(corpus) -> list[str]:
    """The corpus's documents in the order create_tfrecords reads them."""
    from data.corpus import read_documents

    return [doc for path in create_tfrecords.input_files(str(corpus), None) for doc in read_documents(path)]


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer.main(["--base_dir", str(corpus), "--output_dir", str(out), "--file_type", "txt",
                                 "--vocab_size", "600"])


def make_shards(corpus, tokenizer_path, out: Path, mode: str, name: str = "t", **flags) -> list[Path]:
    argv = ["--input_dir", str(corpus), "--name", name, "--output_dir", str(out), "--encoder_path",
            str(tokenizer_path), "--mode", mode, "--processes", "1", "--quiet", "--minimum_size", "0"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return create_tfrecords.main(argv)


def write_configs(root: Path, datasets: dict[str, dict], entries: list, **model) -> Path:
    """A model config and its dataset configs in `root`; returns the model config path."""
    (root / "dataset_configs").mkdir(parents=True, exist_ok=True)
    for dataset_id, values in datasets.items():
        (root / "dataset_configs" / f"{dataset_id}.json").write_text(json.dumps(values))
    values = {"n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 1, "n_vocab": 600, "train_batch_size": 8,
              "datasets": entries, **model}
    path = root / "model.json"
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def document_shards(corpus, tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("documents")
    make_shards(corpus, tokenizer_path, out, "documents", files_per=3)
    return out


def sampler_for(tmp_path, shards_glob, mode, stitch=1, n_ctx=32, seed=0, n_vocab=600, **dataset) -> Sampler:
    values = {"n_vocab": n_vocab, "path": str(shards_glob), "eos_id": 0, "padding_id": 1, **dataset}
    config = load_config(str(write_configs(tmp_path, {"d": values}, [["d", stitch, mode, 1.0]], n_ctx=n_ctx,
                                           seed=seed, n_vocab=n_vocab)))
    return Sampler(config)


# --- text -> shards -> batches -----------------------------------------------------------------


def test_chunks_mode_decodes_back_to_the_original_text(corpus, corpus_documents, tokenizer_path, tmp_path):
    shards = make_shards(corpus, tokenizer_path, tmp_path / "chunks", "chunks", chunk_size=63, files_per=5)
    assert len(shards) > 1 and all(p.name.startswith("t_") for p in shards)
    records = [r for shard in shards for r in read_shard(str(shard))]
    for shard in shards:  # the count in the name is the number of examples
        assert int(shard.stem.split("_")[-1]) == len(read_shard(str(shard)))
    assert all(len(r) == 64 for r in records[:-1]) and 0 < len(records[-1]) <= 64
    tokenizer = load_tokenizer(str(tokenizer_path))
    decoded = tokenizer.decode(np.concatenate(records))
    # every document, tails included (also inside the multi-document jsonl), each ended by <|endoftext|>;
    # the tokenizer's add_prefix_space puts one space before each document
    assert decoded == "".join(" " + doc + "<|endoftext|>" for doc in corpus_documents)

    # the chunks sampler returns the records as they are: one epoch of rows is a permutation of them
    sampler = sampler_for(tmp_path / "cfg", tmp_path / "chunks" / "t_*.tfrecords", "chunks", n_ctx=63)
    full = [tuple(r) for r in records[:-1]]
    rows = sampler.rows(0, range(len(records)), len(records))
    assert sorted(tuple(r) for r in rows if tuple(r) in set(full)) == sorted(full)


def test_documents_modes_give_windows_of_stitched_documents(document_shards, corpus_documents, tokenizer_path, tmp_path):
    tokenizer = load_tokenizer(str(tokenizer_path))
    documents = [tokenizer.encode(doc) + [0] for doc in corpus_documents]
    stream = [tuple(d) for d in documents]
    glob = document_shards / "t_*.tfrecords"

    random_rows = sampler_for(tmp_path / "r", glob, "documents_random", stitch=1, n_ctx=40).rows(0, range(32), 32)
    for row in random_rows:  # a window inside one document (all are longer than 41 tokens)
        assert any(_contains(doc, tuple(row)) for doc in stream)
    assert len({tuple(r[:5]) for r in random_rows}) > 16, "windows should start at varied places"

    fixed_rows = sampler_for(tmp_path / "f", glob, "documents_fixed", stitch=3, n_ctx=2047).rows(0, range(8), 8)
    continued = 0
    for row in fixed_rows:  # starts at a document's start; where that one ends, the next stitched one begins
        first = next(doc for doc in documents if list(row[:len(doc)]) == doc[:len(row)])
        rest = list(row[len(first):])
        if rest:
            continued += 1
            assert any(rest[:len(doc)] == doc[:len(rest)] for doc in documents if doc != first)
            text = tokenizer.decode(row)
            assert "<|endoftext|>" in text and any(" " + doc[:200] in text for doc in corpus_documents)
    assert continued > 0


def _contains(haystack: tuple, needle: tuple) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# --- the shard format --------------------------------------------------------------------------


def test_independently_written_shard_reads_and_our_shards_read_independently(tmp_path):
    rng = np.random.default_rng(0)
    examples = [list(rng.integers(0, 2**33, size=n)) for n in (1, 0, 50, 300)] + [[0, 127, 128, 16383, 16384]]
    theirs = tmp_path / "theirs.tfrecords"
    independent_write(theirs, examples)
    assert [list(r) for r in read_shard(str(theirs))] == examples
    ours = tmp_path / "ours.tfrecords"
    write_shard(str(ours), [np.asarray(e) for e in examples])
    assert independent_read(ours) == examples
    assert ours.read_bytes() == theirs.read_bytes()


def test_truncated_shard_error_names_file_and_offset(document_shards, tmp_path):
    shard = sorted(document_shards.glob("t_*.tfrecords"))[0]
    cut = tmp_path / "cut" / shard.name
    cut.parent.mkdir()
    blob = shard.read_bytes()
    first_length = struct.unpack_from("<Q", blob)[0]
    second_record = 16 + first_length
    cut.write_bytes(blob[:second_record + 20])  # the second record's header and a few data bytes
    with pytest.raises(DataError, match=rf"{cut}: truncated shard.*byte offset {second_record}\b"):
        sampler_for(tmp_path / "cfg", cut, "documents_random")


def test_bad_checksum_error_names_file_and_offset(document_shards, tmp_path):
    shard = sorted(document_shards.glob("t_*.tfrecords"))[0]
    bad = tmp_path / "bad" / shard.name
    bad.parent.mkdir()
    blob = bytearray(shard.read_bytes())
    second_record = 16 + struct.unpack_from("<Q", blob)[0]
    blob[second_record + 12 + 7] ^= 0x01  # one bit of the second record's data
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=rf"{bad}: corrupt shard: bad data checksum.*byte offset {second_record}\b"):
        sampler_for(tmp_path / "cfg", bad, "documents_random")


def test_token_id_at_or_above_n_vocab_is_refused_naming_dataset_and_id(tmp_path):
    write_shard(str(tmp_path / "s_0_2.tfrecords"), [np.arange(10), np.asarray([5, 599, 600, 3])])
    with pytest.raises(DataError, match=r"dataset 'd'.*token id 600 in .*s_0_2\.tfrecords.*>= n_vocab = 600"):
        sampler_for(tmp_path / "cfg", tmp_path / "s_*.tfrecords", "chunks", n_vocab=600)
    sampler_for(tmp_path / "ok", tmp_path / "s_*.tfrecords", "chunks", n_vocab=601)  # one more row: accepted


def test_missing_shards_and_eval_path_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'path'.*no shard matches"):
        sampler_for(tmp_path / "cfg", tmp_path / "nothing_*.tfrecords", "chunks")
    write_shard(str(tmp_path / "s_0_1.tfrecords"), [np.arange(40)])
    sampler = sampler_for(tmp_path / "cfg2", tmp_path / "s_*.tfrecords", "chunks")
    with pytest.raises(ConfigError, match="eval_path"):
        Sampler(sampler.config, "eval")


# --- determinism -------------------------------------------------------------------------------


def test_resumed_sampler_sees_the_uninterrupted_batches_across_epochs(document_shards, tmp_path):
    glob = document_shards / "t_*.tfrecords"
    uninterrupted = sampler_for(tmp_path / "a", glob, "documents_random", stitch=2, seed=7)
    n_docs = uninterrupted.datasets[0].n_records
    batch = 4
    steps_per_epoch = (n_docs // 2) // batch + 1
    k = 2 * steps_per_epoch - 2  # steps k..k+5 cross the end of the second epoch
    history = {step: uninterrupted.rows(step, range(batch), batch) for step in range(k + 6)}
    resumed = sampler_for(tmp_path / "b", glob, "documents_random", stitch=2, seed=7)
    for step in range(k, k + 6):
        np.testing.assert_array_equal(resumed.rows(step, range(batch), batch), history[step])
    # epochs differ in order (examples are reshuffled, not replayed)
    assert not np.array_equal(history[0], history[steps_per_epoch])
    other_seed = sampler_for(tmp_path / "c", glob, "documents_random", stitch=2, seed=8)
    assert not np.array_equal(other_seed.rows(0, range(batch), batch), history[0])


def test_rows_are_the_same_however_the_batch_is_split(document_shards, tmp_path):
    sampler = sampler_for(tmp_path, document_shards / "t_*.tfrecords", "documents_random", stitch=2)
    whole = sampler.rows(3, range(8), 8)
    halves = np.concatenate([sampler.rows(3, range(4), 8), sampler.rows(3, range(4, 8), 8)])
    np.testing.assert_array_equal(halves, whole)
    np.testing.assert_array_equal(sampler.rows(3, [6, 1], 8), whole[[6, 1]])


def test_mixture_weights_are_honoured(tmp_path):
    for name, low in (("a", 100), ("b", 200), ("c", 300)):
        write_shard(str(tmp_path / f"{name}_0_50.tfrecords"), [np.arange(low, low + 40) for _ in range(50)])
    datasets = {name: {"n_vocab": 600, "path": str(tmp_path / f"{name}_*.tfrecords"), "eos_id": 0}
                for name in "abc"}
    entries = [["a", 1, "chunks", 6.0], ["b", 1, "chunks", 3.0], ["c", 1, "chunks", 1.0]]
    config = load_config(str(write_configs(tmp_path / "cfg", datasets, entries)))
    sampler = Sampler(config)
    rows = np.concatenate([sampler.rows(step, range(8), 8) for step in range(500)])
    shares = np.bincount(rows[:, 0] // 100, minlength=4)[1:] / len(rows)
    np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.02)


def test_global_batch_matches_rows_on_a_sharded_mesh(document_shards, tmp_path):
    import jax
    from jax.sharding import Mesh

    from inputs import global_batch
    from mesh import MeshLayout

    sampler = sampler_for(tmp_path, document_shards / "t_*.tfrecords", "documents_random", stitch=2)
    layout = MeshLayout(Mesh(np.asarray(jax.devices()[:1]), ("x",)), {"batch": "x"})
    inputs, labels = global_batch(sampler, 5, layout, 8)
    rows = sampler.rows(5, range(8), 8)
    np.testing.assert_array_equal(np.asarray(inputs), rows[:, :-1])
    np.testing.assert_array_equal(np.asarray(labels), rows[:, 1:])
    assert inputs.dtype == np.int32 and inputs.shape == (8, 32)


TWO_PROCESS_WORKER = r"""
import sys, json
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:%(port)d", num_processes=2, process_id=int(sys.argv[1]))
from jax.sharding import Mesh
from configs import load_config
from inputs import Sampler, global_batch
from mesh import MeshLayout
config = load_config(%(config)r)
sampler = Sampler(config)
layout = MeshLayout(Mesh(np.asarray(jax.devices()), ("x",)), {"batch": "x"})
inputs, labels = global_batch(sampler, 4, layout, 8)
local = {int(s.index[0].start or 0): np.asarray(s.data).tolist() for s in inputs.addressable_shards}
print(json.dumps(local))
"""


def test_two_processes_build_the_single_process_batch(document_shards, tmp_path):
    """Two jax.distributed processes (gloo on CPU), each building only its half of the batch."""
    import socket

    sampler = sampler_for(tmp_path, document_shards / "t_*.tfrecords", "documents_random", stitch=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(TWO_PROCESS_WORKER % {"port": port, "config": sampler.config.source})
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the user's packages
    env = {**os.environ, "PYTHONPATH": python_path, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    workers = [subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(2)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    expected = sampler.rows(4, range(8), 8)[:, :-1]
    starts = sorted(int(k) for part in outputs for k in part)
    assert starts == [0, 4], "each process holds one half"
    for part in outputs:
        for start, block in part.items():
            np.testing.assert_array_equal(np.asarray(block), expected[int(start):int(start) + len(block)])


# --- create_tfrecords: interruption and resumption ---------------------------------------------


def test_create_tfrecords_killed_midway_resumes_to_the_uninterrupted_result(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(p for p in STDLIB.glob("*.py") if 2_000 < p.stat().st_size < 20_000)[:40]
    with open(corpus / "all.jsonl", "w") as f:  # one multi-document archive, fewer files than processes
        for path in sources:
            text = path.read_text(errors="replace")
            for i in range(0, len(text), 1500):
                f.write(json.dumps({"text": text[i:i + 1500]}) + "\n")

    def argv(out):
        return ["--input_dir", str(corpus), "--name", "k", "--output_dir", str(out), "--encoder_path",
                str(tokenizer_path), "--mode", "chunks", "--chunk_size", "127", "--files_per", "4",
                "--minimum_size", "0", "--quiet"]

    reference = tmp_path / "reference"
    create_tfrecords.main([*argv(reference), "--processes", "2"])
    expected = {p.name: p.read_bytes() for p in reference.glob("*.tfrecords")}
    assert len(expected) > 20, len(expected)

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(REPO / "data" / "create_tfrecords.py"), *argv(interrupted), "--processes", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and len(list(interrupted.glob("*.tfrecords"))) < 3:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {p.name for p in interrupted.glob("*.tfrecords")}
    assert 3 <= len(written) < len(expected), "the run should have been stopped part-way"

    create_tfrecords.main([*argv(interrupted), "--processes", "1"])
    assert {p.name: p.read_bytes() for p in interrupted.glob("*.tfrecords")} == expected
    assert not list(interrupted.glob("*.tmp-*"))
    create_tfrecords.main([*argv(interrupted), "--processes", "1"])  # complete: a rerun changes nothing
    assert {p.name: p.read_bytes() for p in interrupted.glob("*.tfrecords")} == expected


def test_create_tfrecords_refuses_to_mix_runs_with_different_flags(corpus, tokenizer_path, tmp_path):
    make_shards(corpus, tokenizer_path, tmp_path, "documents", files_per=3)
    with pytest.raises(ConfigError, match="files_per"):
        make_shards(corpus, tokenizer_path, tmp_path, "documents", files_per=4)


# --- tools and tokenizers ----------------------------------------------------------------------


def test_train_tokenizer_writes_special_ids_and_never_overwrites_silently(tokenizer_path, corpus, capsys):
    tokenizer = load_tokenizer(str(tokenizer_path))
    assert tokenizer.tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.eos_id == 0
    assert tokenizer.tokenizer.token_to_id("<|padding|>") == 1
    suggested = json.loads((tokenizer_path.parent / "dataset_config.json").read_text())
    assert suggested["eos_id"] == 0 and suggested["padding_id"] == 1 and suggested["n_vocab"] == 600
    before = tokenizer_path.read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        train_tokenizer.main(["--base_dir", str(corpus), "--output_dir", str(tokenizer_path.parent),
                              "--file_type", "txt", "--vocab_size", "300"])
    assert tokenizer_path.read_bytes() == before


def test_missing_pretrained_tokenizer_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*tokenizer_path"):
        load_tokenizer("no-such-model-here", is_pretrained=True)


def test_check_dataset_reports_id_range_and_decoded_samples(document_shards, tokenizer_path, tmp_path):
    values = {"n_vocab": 600, "path": str(document_shards / "t_*.tfrecords"), "eos_id": 0, "padding_id": 1,
              "tokenizer_path": str(tokenizer_path)}
    config = load_config(str(write_configs(tmp_path, {"d": values}, [["d", 2, "documents_random", 1.0]])))
    report = check_dataset(config)
    assert "token ids 0.." in report and "against n_vocab 600: ok" in report
    assert "--- sample 0" in report and "def " in report
    config = config.replace(n_vocab=300)
    report = check_dataset(config)
    assert "TOO LARGE" in report and "PROBLEMS" in report


def test_shards_on_another_filesystem_take_the_same_path(tmp_path):
    """fsspec's in-memory filesystem stands in for gs://: same glob, open, seek and read calls."""
    for i in range(2):
        write_shard(f"memory://bucket/mem_{i}_3.tfrecords", [np.arange(i * 100, i * 100 + 40)] * 3)
    sampler = sampler_for(tmp_path, "memory://bucket/mem_*.tfrecords", "chunks")
    paths = sampler.datasets[0].paths
    assert len(paths) == 2 and all(p.startswith("memory://") and "bucket/mem_" in p for p in paths)
    rows = sampler.rows(0, range(6), 6)
    assert sorted(rows[:, 0].tolist()) == [0, 0, 0, 100, 100, 100]


def test_ftfy_shortcut_changes_nothing_ftfy_would_not(tmp_path):
    import ftfy

    samples = [(STDLIB / name).read_text() for name in SOURCE_MODULES] + [
        "plain ascii\tand newline\n", "caf\u00c3\u00a9 mojibake", "a &amp; b", "line\r\nbreak", "ctrl\x07char",
        "\ufb01 ligature", "\u201ccurly\u201d", "form\x0cfeed",
    ]
    for text in samples:
        assert create_tfrecords.fix_text(text) == ftfy.fix_text(text, normalization="NFKC")


def test_an_encoder_path_that_does_not_exist_is_one_clear_line(corpus, tmp_path):
    missing = tmp_path / "no_such" / "byte-level-bpe.tokenizer.json"
    with pytest.raises(ConfigError) as stop:
        create_tfrecords.main(["--input_dir", str(corpus), "--name", "t", "--output_dir", str(tmp_path / "out"),
                               "--encoder_path", str(missing), "--quiet"])
    message = str(stop.value)
    assert message.startswith("--encoder_path") and str(missing) in message and "\n" not in message


def test_a_prompt_file_that_is_not_text_is_a_config_error(tmp_path):
    from sample import read_prompt

    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"ok \xff\xfe\x00 binary")
    with pytest.raises(ConfigError, match=r"prompt\.bin: not UTF-8 text \(byte 3 is 0xff\)"):
        read_prompt(str(binary))


# --- one-line errors for bad data and bad tool input -----------------------------------------------


def test_a_shard_glob_naming_a_folder_is_a_config_error_suggesting_the_files(tmp_path):
    (tmp_path / "shards").mkdir()
    write_shard(str(tmp_path / "shards" / "s_0_1.tfrecords"), [np.arange(40)])
    with pytest.raises(ConfigError) as err:
        sampler_for(tmp_path / "cfg", tmp_path / "shards", "chunks")
    message = str(err.value)
    assert "dataset 'd'" in message and "matches the folder" in message
    assert f"{tmp_path / 'shards'}/*.tfrecords" in message and "\n" not in message


def test_shards_whose_records_are_all_empty_are_refused_naming_the_shards(tmp_path):
    write_shard(str(tmp_path / "empty_0_3.tfrecords"), [[], [], []])
    with pytest.raises(DataError, match=r"dataset 'd'.*the 3 records of its shards \(.*empty_0_3.tfrecords\) hold no tokens"):
        sampler_for(tmp_path / "cfg", tmp_path / "empty_*.tfrecords", "documents_random")


def test_dry_run_dataset_check_names_the_dataset_and_glob_and_checks_eval_path_only_when_evaluating(tmp_path):
    from inputs import check_shards_exist

    write_shard(str(tmp_path / "s_0_1.tfrecords"), [np.arange(40)])
    dataset = {"n_vocab": 600, "path": str(tmp_path / "s_*.tfrecords"), "eval_path": str(tmp_path / "ev_*.tfrecords")}
    config = load_config(str(write_configs(tmp_path / "cfg", {"d": dataset}, [["d", 1, "chunks", 1.0]])))
    assert check_shards_exist(config) == [f"dataset 'd': path {tmp_path / 's_*.tfrecords'} matches 1 shard(s)"]
    with pytest.raises(ConfigError, match=r"dataset 'd' \(.*d.json\): key 'eval_path': no shard matches .*ev_\*"):
        check_shards_exist(config.replace(eval_steps=2))
    with pytest.raises(ConfigError, match="'datasets' names 'elsewhere'"):
        check_shards_exist(config.replace(datasets=[["elsewhere", 1, "chunks", 1.0]]))


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / tool), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def assert_one_error_line(result: subprocess.CompletedProcess, *names: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1 and all(name in result.stderr for name in names), result.stderr


def test_train_tokenizer_refuses_a_file_that_is_not_utf8_and_an_empty_corpus(tmp_path):
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    result = run_tool("train_tokenizer.py", "--base_dir", str(tmp_path / "latin1"), "--output_dir", str(tmp_path / "t1"))
    assert_one_error_line(result, str(tmp_path / "latin1" / "a.txt"), "not UTF-8", "byte 3 is 0xe9")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    result = run_tool("train_tokenizer.py", "--base_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "t2"))
    assert_one_error_line(result, f"--base_dir {tmp_path / 'empty'}", "empty")


def test_create_tfrecords_refuses_a_corpus_without_tokens_and_a_missing_encoder_path(tokenizer_path, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    result = run_tool("create_tfrecords.py", "--input_dir", str(tmp_path / "empty"), "--output_dir",
                      str(tmp_path / "out"), "--encoder_path", str(tokenizer_path), "--processes", "1", "--quiet")
    assert_one_error_line(result, f"--input_dir {tmp_path / 'empty'}", "no tokens", "no shards written")
    assert not list((tmp_path / "out").glob("*.tfrecords"))
    missing = tmp_path / "nowhere" / "tokenizer.json"
    result = run_tool("create_tfrecords.py", "--input_dir", str(tmp_path / "empty"), "--output_dir",
                      str(tmp_path / "out"), "--encoder_path", str(missing), "--processes", "1", "--quiet")
    assert_one_error_line(result, "--encoder_path", str(missing), "no such file")


def test_a_dataset_eos_id_beyond_the_model_vocabulary_is_refused_naming_the_dataset_config(tmp_path):
    write_shard(str(tmp_path / "s_0_1.tfrecords"), [np.arange(40)])
    with pytest.raises(ConfigError, match=r"d.json: key 'eos_id' = 600 is >= the model's n_vocab = 600"):
        sampler_for(tmp_path / "cfg", tmp_path / "s_*.tfrecords", "chunks", eos_id=600)


# --- GPT-Neo's data-tool flags, and files that are not UTF-8 ---------------------------------------


def test_create_tfrecords_takes_gpt_neo_flags_with_gpt_neo_meanings(tokenizer_path, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    wikitext = "caf\u00c3\u00a9 one @-@ two , three\n" * 3  # mojibake for ftfy, WikiText spacing for the detokenizer
    (corpus / "a.txt").write_text(wikitext)
    (corpus / "b.txt").write_text("second document, plain\n")
    tokenizer = load_tokenizer(str(tokenizer_path))

    def records(out: Path, *flags: str) -> list[list[int]]:
        create_tfrecords.main(["--input_dir", str(corpus), "--name", "g", "--output_dir", str(out), "--encoder_path",
                               str(tokenizer_path), "--mode", "documents", "--processes", "1", "--quiet",
                               "--minimum_size", "0", *flags])
        return [list(r) for shard in sorted(out.glob("g_*.tfrecords")) for r in read_shard(str(shard))]

    # GPT-Neo's store_false flags: --ftfy and --wikitext-detokenize turn those steps off; a separator
    # of several ids, in GPT-Neo's list form and as plain ids
    raw = records(tmp_path / "raw", "--separator", "[0]", "1", "--ftfy", "--wikitext-detokenize",
                  "--write_dataset_config", "--dataset_config_dir", str(tmp_path / "dataset_configs"))
    assert raw == [tokenizer.encode(wikitext) + [0, 1], tokenizer.encode("second document, plain\n") + [0, 1]]
    cleaned = records(tmp_path / "cleaned", "--separator", "[0, 1]", "--wikitext_detokenize")
    assert cleaned[0] == tokenizer.encode("caf\u00e9 one-two, three\n" * 3) + [0, 1]

    # the dataset config names the shards and the tokenizer, and trains as it is
    written = json.loads((tmp_path / "dataset_configs" / "g.json").read_text())
    assert written == {"n_vocab": 600, "path": str(tmp_path / "raw" / "g_*.tfrecords"), "eval_path": "",
                       "tokenizer_is_pretrained": False, "tokenizer_path": str(tokenizer_path), "eos_id": 0,
                       "padding_id": 1}
    config = load_config(str(write_configs(tmp_path, {}, [["g", 2, "documents_fixed", 1.0]], n_ctx=16)))
    assert Sampler(config).rows(0, range(2), 2).shape == (2, 17)
    with pytest.raises(ConfigError, match=r"g\.json exists and describes other shards"):
        records(tmp_path / "elsewhere", "--write_dataset_config", "--dataset_config_dir", str(tmp_path / "dataset_configs"))

    for separator, message in [("x", "'x' is not a token id"), ("600", "id 600 is not in the tokenizer"),
                               ("[]", "'\\[\\]' is not a token id")]:
        with pytest.raises(ConfigError, match=f"--separator {re.escape(separator)}: {message}"):
            records(tmp_path / "bad", "--separator", separator)
    with pytest.raises(SystemExit):
        create_tfrecords.parse_args(["--input_dir", str(corpus), "--use_gpt2_tokenizer", "--encoder_path", "tok.json"])


def test_use_gpt2_tokenizer_reads_gpt2_from_the_local_hugging_face_cache(corpus, tokenizer_path, tmp_path):
    # a Hugging Face cache holding a tokenizer under GPT-2's name (the real one is not on this machine)
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text("0123abc")
    flags = ["--input_dir", str(corpus), "--name", "p", "--mode", "documents", "--processes", "1", "--quiet",
             "--minimum_size", "0", "--separator", "0"]
    result = subprocess.run([sys.executable, str(REPO / "data" / "create_tfrecords.py"), *flags, "--output_dir",
                             str(tmp_path / "gpt2"), "--use_gpt2_tokenizer"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr
    make_shards(corpus, tokenizer_path, tmp_path / "file", "documents", name="p", separator=0)
    assert ([p.read_bytes() for p in sorted((tmp_path / "gpt2").glob("p_*"))]
            == [p.read_bytes() for p in sorted((tmp_path / "file").glob("p_*"))])


def test_both_data_tools_stop_at_the_same_file_that_is_not_utf8_or_skip_it_with_a_warning(tokenizer_path, tmp_path, capsys):
    good_text = "plain UTF-8 text about tokens and shards.\n" * 30
    for folder in ("good", "mixed"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(good_text)
    (tmp_path / "mixed" / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    bad = str(tmp_path / "mixed" / "b.txt")
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')

    def tokenizer_of(folder: str, *flags: str) -> str:
        path = train_tokenizer.main(["--base_dir", str(tmp_path / folder), "--output_dir", str(tmp_path / f"tok_{folder}"),
                                     "--vocab_size", "300", "--overwrite", *flags])
        return path.read_text()

    def shards_of(folder: str, *flags: str) -> list[list[int]]:
        out = tmp_path / f"shards_{folder}"
        create_tfrecords.main(["--input_dir", str(tmp_path / folder), "--output_dir", str(out), "--encoder_path",
                               str(tokenizer_path), "--mode", "documents", "--separator", "0", "--processes", "1",
                               "--quiet", "--minimum_size", "0", *flags])
        return [list(r) for shard in sorted(out.glob("*.tfrecords")) for r in read_shard(str(shard))]

    for run in (tokenizer_of, shards_of):  # by default both stop, naming the file and its first bad byte
        with pytest.raises(DataError, match=re.escape(f"{bad}: not UTF-8 text (byte 3 is 0xe9)") + ".*--skip_non_utf8"):
            run("mixed")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'lines' / 'c.jsonl'}: not UTF-8 text (byte 30 is 0xe9)")):
        shards_of("lines")
    capsys.readouterr()

    # with --skip_non_utf8 both leave out that file, saying so, and make what the good files alone make
    assert tokenizer_of("mixed", "--skip_non_utf8") == tokenizer_of("good")
    assert shards_of("mixed", "--skip_non_utf8") == [load_tokenizer(str(tokenizer_path)).encode(good_text) + [0]]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {bad}: not UTF-8 text (byte 3 is 0xe9): skipped (--skip_non_utf8)"] * 2
