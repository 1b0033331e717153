"""A mixture-of-experts model against a dense one with the same active parameters: training
tokens/s and per-device parameter memory, in one run, the models taking turns step by step.

The shape: 4 layers, n_embd 256, MoE in layers 1 and 3 with 8 experts of hidden width 512 under
top-2 gating, so a token meets 2 x 512 = 1024 hidden units there, as in the dense model's MLP
(4 * n_embd). Three models on the same mesh of 4 devices (simulated CPU devices where there is
no accelerator), all data-parallel (batch:x):
  dense           the peer
  moe_replicated  every device holds all 8 experts
  moe_sharded     experts:x as well: each device holds 2 experts, tokens reach them by all-to-all
Parameter memory is the bytes of parameters on device 0, all and the experts' alone (Adam's state
is twice that again).

    PYTHONPATH=. .venv/bin/python bench/moe_throughput.py
    PYTHONPATH=. .venv/bin/python bench/moe_throughput.py --steps 3 --n_ctx 128

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEVICES = 4
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_throughput import median, time_alternating  # noqa: E402

SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_vocab": 4096, "train_batch_size": 8}
MOE = {"moe_layers": [1, 3], "moe_params": {"moe_num_experts": 8, "moe_hidden_size": 512}}
MODELS = {
    "dense": ({}, "batch:x"),
    "moe_replicated": (MOE, "batch:x"),
    "moe_sharded": (MOE, "batch:x,experts:x"),
}


def step_runner(name: str, n_ctx: int, precision: str):
    """(run one train step, (parameter bytes, expert parameter bytes) on device 0, active parameters per
    token) for MODELS[name]."""
    import jax
    import numpy as np

    import model_fns
    from configs import validate
    from mesh import build_mesh_layout
    from models import gpt2
    from optimizers import make_optimizer

    options, layout_text = MODELS[name]
    config = validate(dict(SHAPE, **options, n_ctx=n_ctx, precision=precision, mesh_shape=f"x:{DEVICES}",
                           layout=layout_text, train_steps=1000), "bench/moe_throughput.py")
    layout = build_mesh_layout(config, jax.devices()[:DEVICES])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state = {"s": model_fns.init_state(config, layout, optimizer, shardings)}
    tokens = np.random.default_rng(0).integers(0, config.n_vocab, (config.train_batch_size, n_ctx + 1), dtype=np.int32)
    batch_sharding = layout.sharding(model_fns.BATCH_DIMS)
    inputs, labels = (jax.device_put(tokens[:, :-1], batch_sharding), jax.device_put(tokens[:, 1:], batch_sharding))
    compiled = model_fns.make_train_step(config, layout, optimizer, shardings).lower(state["s"], inputs, labels).compile()
    first_device = jax.devices()[0]
    expert_paths = {jax.tree_util.keystr(path) for path, w in
                    jax.tree_util.tree_flatten_with_path(gpt2.weights(config), is_leaf=gpt2.is_weight)[0]
                    if w.dims and w.dims[0] == "experts"}

    def bytes_on_first_device(experts_only: bool) -> int:
        return sum(shard.data.nbytes for path, leaf in jax.tree_util.tree_flatten_with_path(state["s"]["params"])[0]
                   if not experts_only or jax.tree_util.keystr(path) in expert_paths
                   for shard in leaf.addressable_shards if shard.device == first_device)

    parameter_bytes = (bytes_on_first_device(False), bytes_on_first_device(True))

    def run_step():
        state["s"], metrics = compiled(state["s"], inputs, labels)
        metrics["loss"].block_until_ready()

    return run_step, parameter_bytes, gpt2.parameter_count(config, matmul_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_ctx", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, taking turns")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import jax

    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices; JAX sees {jax.device_count()}")
    print(f"model: {SHAPE}, n_ctx {args.n_ctx}, MoE {MOE}; {args.precision}; mesh x:{DEVICES}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    runners, memory, active = [], {}, {}
    for name in MODELS:
        run_step, memory[name], active[name] = step_runner(name, args.n_ctx, args.precision)
        runners.append(run_step)
    seconds = dict(zip(MODELS, time_alternating(runners, args.steps, warmup=1)))
    tokens = SHAPE["train_batch_size"] * args.n_ctx
    results = {"shape": SHAPE, "moe": MOE, "n_ctx": args.n_ctx, "precision": args.precision, "devices": DEVICES,
               "device": jax.devices()[0].device_kind}
    for name in MODELS:
        rate = tokens / median(seconds[name])
        total, experts = memory[name]
        results[name] = {"tokens_per_sec": round(rate, 1), "parameter_mib_per_device": round(total / 2**20, 2),
                         "expert_parameter_mib_per_device": round(experts / 2**20, 2), "active_parameters": active[name]}
        print(f"{name:15s} {rate:9,.0f} tok/s  parameters on one device {total / 2**20:7.2f} MiB (experts "
              f"{experts / 2**20:6.2f} MiB)  active parameters per token {active[name]:,}")
    step_ratio = median(seconds["moe_replicated"]) / median(seconds["dense"])
    memory_ratio = memory["moe_replicated"][1] / memory["moe_sharded"][1]
    results |= {"moe_step_time_over_dense": round(step_ratio, 3),
                "sharded_step_time_over_replicated": round(median(seconds["moe_sharded"]) / median(seconds["moe_replicated"]), 3),
                "replicated_over_sharded_expert_memory": round(memory_ratio, 3)}
    print(f"MoE step / dense step: {step_ratio:.2f}x (target <= 1.5x); sharded / replicated step: "
          f"{results['sharded_step_time_over_replicated']:.2f}x; expert parameter memory per device, replicated / "
          f"sharded: {memory_ratio:.2f}x (the axis size: {DEVICES})")
    import machine

    results["machine"] = machine.describe()
    print(json.dumps(results))


if __name__ == "__main__":
    from main import reuse_freed_memory

    reuse_freed_memory()
    main()
