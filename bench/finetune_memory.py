"""Fine-tuning memory and speed: training every weight of the 125M shape against LoRA rank 8 on q
and v (models/lora.py), in one run. For each: the optimizer state's bytes (from the state's
shapes), the compiled train step's memory (XLA's memory_analysis: arguments, outputs,
temporaries), and tokens per second, the two stepping in turns so that a busy spell on a shared
machine falls on both alike.

    python bench/finetune_memory.py                       # 125M, n_ctx 512, batch 4
    python bench/finetune_memory.py --steps 3 --n_ctx 256

Targets (issue 17): LoRA's optimizer state at most 1% of full fine-tuning's, its step no slower.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE_125M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_vocab": 50257,
              "attention_types": [[["global", "local"], 6]], "local_attention_radius": 256}


def config_for(n_ctx: int, batch: int, precision: str, lora_rank: int):
    from configs import validate

    values = dict(SHAPE_125M, n_ctx=n_ctx, train_batch_size=batch, precision=precision, warmup_steps=10,
                  train_steps=1000, lr=1e-4, mesh_shape="", layout="")
    if lora_rank:
        values |= {"lora_rank": lora_rank, "lora_targets": ["q", "v"]}
    return validate(values, "bench")


def runner(config):
    """(one train step, figures): the state, its optimizer state's bytes and the compiled step's
    memory as XLA plans it."""
    import jax
    import numpy as np

    import model_fns
    from mesh import build_mesh_layout
    from optimizers import make_optimizer

    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = {"s": jax.block_until_ready(model_fns.init_state(config, layout, optimizer, shardings))}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.n_vocab, (config.train_batch_size, config.n_ctx + 1), dtype=np.int32)
    inputs, labels = jax.numpy.asarray(tokens[:, :-1]), jax.numpy.asarray(tokens[:, 1:])
    start = time.perf_counter()
    step = model_fns.make_train_step(config, layout, optimizer, shardings).lower(state["s"], inputs, labels).compile()
    compile_seconds = time.perf_counter() - start
    memory = step.memory_analysis()

    def total_bytes(tree):
        return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    figures = {
        "trained_parameters": sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state["s"]["params"])),
        "optimizer_state_bytes": total_bytes(state["s"]["opt_state"]),
        "compile_seconds": compile_seconds,
    }
    if memory is not None:
        figures |= {"argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
                    "temp_bytes": memory.temp_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
                    "step_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes}

    def run_step():
        state["s"], metrics = step(state["s"], inputs, labels)
        metrics["loss"].block_until_ready()

    return run_step, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, taking turns")
    parser.add_argument("--n_ctx", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import jax
    from train_throughput import median, time_alternating

    configs = {"full": config_for(args.n_ctx, args.batch, args.precision, 0),
               "lora": config_for(args.n_ctx, args.batch, args.precision, args.lora_rank)}
    runs = {name: runner(config) for name, config in configs.items()}
    times = dict(zip(runs, time_alternating([run for run, _ in runs.values()], args.steps)))
    tokens = args.batch * args.n_ctx
    results = {"device": jax.devices()[0].device_kind, "precision": args.precision, "n_ctx": args.n_ctx,
               "batch": args.batch, "lora_rank": args.lora_rank, "lora_targets": ["q", "v"]}
    mib = 2**20
    for name, (_, figures) in runs.items():
        step_seconds = median(times[name])
        row = figures | {"tokens_per_sec": tokens / step_seconds, "step_seconds": [round(t, 4) for t in times[name]]}
        results[name] = row
        memory = f", compiled step {row['step_bytes'] / mib:,.0f} MiB" if "step_bytes" in row else ""
        print(f"{name}: {row['trained_parameters']:,} trained parameters, optimizer state "
              f"{row['optimizer_state_bytes'] / mib:,.2f} MiB{memory}, {row['tokens_per_sec']:,.0f} tok/s", flush=True)
    full, lora = results["full"], results["lora"]
    results["optimizer_state_ratio"] = lora["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    results["step_time_ratio"] = median(times["lora"]) / median(times["full"])
    if "step_bytes" in full:
        results["step_memory_ratio"] = lora["step_bytes"] / full["step_bytes"]
    print(f"LoRA / full: optimizer state {100 * results['optimizer_state_ratio']:.3f}% (target <= 1%), "
          f"step time {results['step_time_ratio']:.2f}x (target <= 1)"
          + (f", compiled step memory {results['step_memory_ratio']:.2f}x" if "step_memory_ratio" in results else ""))
    import machine

    results["machine"] = machine.describe()
    print(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
