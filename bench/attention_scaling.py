"""Linear attention against global attention as the context grows: training tokens/s and the
train step's memory, for one model shape with every layer `linear`, and the same model with every
layer `global` (the peer), measured in the same run, taking turns step by step.

Memory is what XLA's compiled train step allocates besides its arguments and outputs (temporary
buffers: activations kept for the backward pass, attention scores, the linear running sums), from
the compiled program's memory analysis; on a GPU, the device's peak bytes are reported too.

    PYTHONPATH=. .venv/bin/python bench/attention_scaling.py                       # n_ctx 512 .. 4096
    PYTHONPATH=. .venv/bin/python bench/attention_scaling.py --lengths 256 512 --steps 2

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_throughput import median, time_alternating  # noqa: E402

SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_vocab": 4096, "train_batch_size": 1}
KINDS = ("linear", "global")


def step_runner(kind: str, n_ctx: int, precision: str):
    """(run one train step, temporary bytes of the compiled step) for SHAPE with every layer `kind`."""
    import jax
    import numpy as np

    import model_fns
    from configs import validate
    from mesh import build_mesh_layout
    from optimizers import make_optimizer

    config = validate(dict(SHAPE, n_ctx=n_ctx, attention_types=[[[kind], SHAPE["n_layer"]]], precision=precision,
                           mesh_shape="", layout="", train_steps=1000), "bench/attention_scaling.py")
    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = {"s": model_fns.init_state(config, layout, optimizer, shardings)}
    tokens = np.random.default_rng(0).integers(0, config.n_vocab, (config.train_batch_size, n_ctx + 1), dtype=np.int32)
    inputs, labels = jax.numpy.asarray(tokens[:, :-1]), jax.numpy.asarray(tokens[:, 1:])
    compiled = model_fns.make_train_step(config, layout, optimizer, shardings).lower(state["s"], inputs, labels).compile()
    analysis = compiled.memory_analysis()
    temporary = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None

    def run_step():
        state["s"], metrics = compiled(state["s"], inputs, labels)
        metrics["loss"].block_until_ready()

    return run_step, temporary


def device_peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each, taking turns")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import jax

    print(f"model: {SHAPE}, every layer linear vs every layer global; {args.precision}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    results = {"shape": SHAPE, "precision": args.precision, "device": jax.devices()[0].device_kind}
    for n_ctx in args.lengths:
        runners, memory = [], {}
        for kind in KINDS:
            run_step, memory[kind] = step_runner(kind, n_ctx, args.precision)
            runners.append(run_step)
        seconds = dict(zip(KINDS, time_alternating(runners, args.steps, warmup=1)))
        rates = {kind: SHAPE["train_batch_size"] * n_ctx / median(seconds[kind]) for kind in KINDS}
        row = {f"{kind}_tokens_per_sec": round(rates[kind], 1) for kind in KINDS}
        row |= {f"{kind}_temporary_mib": None if memory[kind] is None else round(memory[kind] / 2**20, 1) for kind in KINDS}
        row |= {"tokens_per_sec_ratio": round(rates["linear"] / rates["global"], 3)}
        if memory["linear"] and memory["global"]:
            row["memory_ratio"] = round(memory["linear"] / memory["global"], 3)
        peak = device_peak_bytes()
        if peak is not None:
            row["device_peak_mib_so_far"] = round(peak / 2**20, 1)
        print(f"n_ctx {n_ctx:5d}: linear {rates['linear']:9,.0f} tok/s, {row['linear_temporary_mib']} MiB | "
              f"global {rates['global']:9,.0f} tok/s, {row['global_temporary_mib']} MiB | "
              f"linear / global: {row['tokens_per_sec_ratio']:.2f}x tok/s, {row.get('memory_ratio')} x memory", flush=True)
        results[f"n_ctx_{n_ctx}"] = row
    import machine

    results["machine"] = machine.describe()
    print(json.dumps(results))


if __name__ == "__main__":
    from main import reuse_freed_memory

    reuse_freed_memory()
    main()
