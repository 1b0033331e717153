"""Data throughput: create_tfrecords tokens/s on the standard library's sources, and the sampler's
tokens/s against what the train step consumes, measured in the same run.

    python bench/data_throughput.py
    python bench/data_throughput.py --train_tokens_per_sec 20000 --train_tokens_per_sec_125m 300

Targets (issue 3): create_tfrecords >= 1M tokens/s with 2 processes; the sampler >= 20x the train
step's consumption at the demo shape (n_ctx 256) and the 125M shape (n_ctx 2048). The train step is
timed here (model_fns.make_train_step) unless its tokens/s is given. The last line printed is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

DEMO_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_ctx": 256, "n_vocab": 4096, "train_batch_size": 8}
SHAPE_125M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_ctx": 2048, "n_vocab": 50257, "train_batch_size": 1}
TARGET_CREATE_TOKENS_PER_SEC = 1_000_000
TARGET_SAMPLER_RATIO = 20


def stdlib_corpus(target: Path, limit_bytes: int) -> int:
    """Copy the standard library's sources (no tests) into target; returns the bytes copied."""
    from data.prepare_demo import stdlib_sources

    total = 0
    target.mkdir(parents=True)
    for i, path in enumerate(stdlib_sources(limit_bytes)):
        data = path.read_bytes()
        (target / f"{i:05d}_{path.name}").write_bytes(data)
        total += len(data)
    return total


def bench_create_tfrecords(workdir: Path, tokenizer: Path, corpus_mb: float, processes: int, ftfy: bool) -> dict:
    from data import create_tfrecords

    corpus = workdir / "corpus"
    if not corpus.exists():
        stdlib_corpus(corpus, int(corpus_mb * 1e6))
    out = workdir / f"shards_{processes}_{int(ftfy)}"
    argv = ["--input_dir", str(corpus), "--file_type", "py", "--name", "bench", "--output_dir", str(out),
            "--encoder_path", str(tokenizer), "--mode", "documents", "--minimum_size", "0",
            "--processes", str(processes), "--quiet", *([] if ftfy else ["--no_ftfy"])]
    start = time.perf_counter()
    shards = create_tfrecords.main(argv)
    seconds = time.perf_counter() - start
    from tfrecord import scan_shard

    tokens = sum(int(scan_shard(str(p)).token_counts.sum()) for p in shards)
    corpus_bytes = sum(p.stat().st_size for p in corpus.iterdir())
    return {"tokens": tokens, "megabytes": corpus_bytes / 1e6, "seconds": seconds, "tokens_per_sec": tokens / seconds}


def bench_tokenizer_ceiling(workdir: Path, tokenizer: Path) -> float:
    """The peer figure: tokens/s of the bare tokenizer (encode_batch on all cores) over the same corpus,
    without reading, cleaning or writing: create_tfrecords cannot beat it."""
    from encoders import load_tokenizer

    loaded = load_tokenizer(str(tokenizer))
    texts = [p.read_text(errors="replace") for p in sorted((workdir / "corpus").iterdir())]
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in loaded.encode_batch(texts))
    return tokens / (time.perf_counter() - start)


def sampler_config(workdir: Path, name: str, shape: dict, dataset: dict, entry: list):
    from configs import load_config

    (workdir / "dataset_configs").mkdir(exist_ok=True)
    (workdir / "dataset_configs" / f"{name}.json").write_text(json.dumps(dataset))
    path = workdir / f"{name}_model.json"
    path.write_text(json.dumps({**shape, "datasets": [entry]}))
    return load_config(str(path))


def bench_sampler(config, seconds: float = 3.0) -> float:
    """tokens/s of Sampler.rows over consecutive steps (whole batches), after start-up."""
    from inputs import Sampler

    sampler = Sampler(config)
    batch = config.train_batch_size
    sampler.rows(0, range(batch), batch)
    step, tokens, start = 1, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += sampler.rows(step, range(batch), batch)[:, :-1].size
        step += 1
    return tokens / (time.perf_counter() - start)


def bench_train_step(shape: dict, steps: int) -> float:
    """tokens/s of model_fns' train step at this shape on one device (median step)."""
    import jax

    import model_fns
    from configs import validate
    from mesh import build_mesh_layout
    from optimizers import make_optimizer

    config = validate({**shape, "mesh_shape": "", "layout": ""}, "bench")
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = model_fns.init_state(config, layout, optimizer, shardings)
    train_step = model_fns.make_train_step(config, layout, optimizer, shardings)
    rng = np.random.default_rng(0)
    shape_2d = (config.train_batch_size, config.n_ctx)
    inputs = jax.numpy.asarray(rng.integers(0, config.n_vocab, shape_2d, dtype=np.int32))
    labels = jax.numpy.asarray(rng.integers(0, config.n_vocab, shape_2d, dtype=np.int32))
    state, metrics = train_step(state, inputs, labels)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, inputs, labels)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return config.train_batch_size * config.n_ctx / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_mb", type=float, default=16.0, help="standard-library sources to tokenize")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--train_tokens_per_sec", type=float, default=None, help="demo shape; default: measured")
    parser.add_argument("--train_tokens_per_sec_125m", type=float, default=None, help="125M shape; default: measured")
    parser.add_argument("--train_steps", type=int, default=3, help="timed train steps per shape")
    parser.add_argument("--sampler_seconds", type=float, default=3.0)
    args = parser.parse_args()
    results: dict = {}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        from data import train_tokenizer

        tokenizer_corpus = workdir / "tokenizer_corpus"
        stdlib_corpus(tokenizer_corpus, 4_000_000)
        tokenizer = train_tokenizer.main(["--base_dir", str(tokenizer_corpus), "--output_dir", str(workdir / "tok"),
                                          "--file_type", "py", "--vocab_size", "4096"])

        for ftfy in (True, False):
            figures = bench_create_tfrecords(workdir, tokenizer, args.corpus_mb, args.processes, ftfy)
            key = "create_tfrecords" + ("" if ftfy else "_no_ftfy")
            results[key] = figures
            print(f"{key}: {figures['tokens']:,} tokens ({figures['megabytes']:.1f} MB) in {figures['seconds']:.1f} s "
                  f"with {args.processes} processes (start-up included): {figures['tokens_per_sec']:,.0f} tokens/s "
                  f"(target {TARGET_CREATE_TOKENS_PER_SEC:,})")

        ceiling = bench_tokenizer_ceiling(workdir, tokenizer)
        results["tokenizer_encode_batch_tokens_per_sec"] = ceiling
        print(f"bare tokenizer encode_batch over the same corpus: {ceiling:,.0f} tokens/s; create_tfrecords reaches "
              f"{results['create_tfrecords']['tokens_per_sec'] / ceiling:.0%} of it")

        demo_shards = workdir / f"shards_{args.processes}_1" / "bench_*.tfrecords"
        demo_dataset = {"n_vocab": 4096, "path": str(demo_shards), "eos_id": 0, "padding_id": 1}
        big_shards = workdir / "chunks2048"
        big_shards.mkdir()
        from tfrecord import write_shard

        rng = np.random.default_rng(0)
        for i in range(4):  # GPT-2-sized ids in GPT-Neo's chunk layout
            write_shard(str(big_shards / f"big_{i}_500.tfrecords"),
                        (rng.integers(0, 50257, 2049) for _ in range(500)))
        big_dataset = {"n_vocab": 50257, "path": str(big_shards / "big_*.tfrecords"), "eos_id": 50256}

        cases = {
            "demo_documents_random": (DEMO_SHAPE, demo_dataset, ["demo", 4, "documents_random", 1.0]),
            "125M_documents_random": (SHAPE_125M | {"train_batch_size": 8}, demo_dataset | {"n_vocab": 50257},
                                      ["demo", 4, "documents_random", 1.0]),
            "125M_chunks": (SHAPE_125M | {"train_batch_size": 8}, big_dataset, ["big", 1, "chunks", 1.0]),
        }
        for name, (shape, dataset, entry) in cases.items():
            config = sampler_config(workdir, entry[0], shape, dataset, entry)
            results[f"sampler_{name}_tokens_per_sec"] = bench_sampler(config, args.sampler_seconds)
            print(f"sampler {name} (n_ctx {shape['n_ctx']}): "
                  f"{results[f'sampler_{name}_tokens_per_sec']:,.0f} tokens/s")

    train_demo = args.train_tokens_per_sec or bench_train_step(DEMO_SHAPE, args.train_steps)
    print(f"train step, demo shape: {train_demo:,.0f} tokens/s" + ("" if args.train_tokens_per_sec else " (measured)"))
    train_125m = args.train_tokens_per_sec_125m or bench_train_step(SHAPE_125M, max(1, args.train_steps - 1))
    print(f"train step, 125M shape: {train_125m:,.0f} tokens/s" + ("" if args.train_tokens_per_sec_125m else " (measured)"))
    results["train_step_demo_tokens_per_sec"] = train_demo
    results["train_step_125M_tokens_per_sec"] = train_125m
    ratios = {
        "demo_documents_random": results["sampler_demo_documents_random_tokens_per_sec"] / train_demo,
        "125M_documents_random": results["sampler_125M_documents_random_tokens_per_sec"] / train_125m,
        "125M_chunks": results["sampler_125M_chunks_tokens_per_sec"] / train_125m,
    }
    for name, ratio in ratios.items():
        verdict = "meets" if ratio >= TARGET_SAMPLER_RATIO else "BELOW"
        print(f"sampler / train step, {name}: {ratio:,.0f}x ({verdict} the {TARGET_SAMPLER_RATIO}x target)")
    results["sampler_over_train_step"] = ratios
    results["create_tfrecords_over_target"] = results["create_tfrecords"]["tokens_per_sec"] / TARGET_CREATE_TOKENS_PER_SEC
    results["cpu_count"] = os.cpu_count()
    import machine

    results["machine"] = machine.describe()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
