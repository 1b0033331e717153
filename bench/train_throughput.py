"""Training throughput: neomesh's train step against Hugging Face transformers' GPTNeoForCausalLM
(PyTorch, AdamW, float32, same shape and batch; with --precision bfloat16 both compute in
bfloat16 over float32 weights, Hugging Face under torch.autocast) in the same run, the two taking
turns step by step, and MFU against a float32 matrix-multiply roofline measured on the same machine (XLA's own
rate) and against the CPU's float32 peak estimated from its flags (machine.py). The JSON line's
"machine" names the CPU, its cores and flags, and PyTorch's matmul rate and the memory bandwidth
measured in the same run, so that figures from different machines can be told apart.

Before the first compile, neomesh's start-up probe (machine.py, as main.py runs it) picks
XLA:CPU's dot library and the CPU kernels for this machine; --no_probe keeps XLA's defaults.

Hugging Face runs in a process of its own that inherits neomesh's malloc setting
(main.REUSE_FREED_MEMORY); it trains faster with it than with glibc's defaults.

    python bench/train_throughput.py              # both shapes
    python bench/train_throughput.py --shapes small --steps 5

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_ctx": 256, "n_vocab": 50257, "train_batch_size": 8},
    "125M": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_ctx": 512, "n_vocab": 50257, "train_batch_size": 4},
}


def config_for(shape: dict, precision: str = "float32", cpu_probe: str = "auto"):
    from configs import validate

    values = dict(shape, precision=precision, warmup_steps=10, train_steps=1000, lr=1e-4,
                  mesh_shape="", layout="", z_loss=1e-4, cpu_probe=cpu_probe)
    return validate(values, "bench")


def time_alternating(run_steps: list, steps: int, warmup: int = 2) -> list[list[float]]:
    """Each runner's seconds for `steps` timed steps after `warmup` untimed ones. The runners
    take turns step by step, so a busy spell on a shared machine falls on all of them alike and
    their ratio stays fair."""
    for _ in range(warmup):
        for run_step in run_steps:
            run_step()
    times = [[] for _ in run_steps]
    for _ in range(steps):
        for run_step, runner_times in zip(run_steps, times):
            start = time.perf_counter()
            run_step()
            runner_times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def neomesh_runner(config):
    """(run one train step, seconds a user waits before the first: making the initial state,
    then compiling the step)."""
    import jax
    import numpy as np

    import model_fns
    from mesh import build_mesh_layout
    from optimizers import make_optimizer

    layout = build_mesh_layout(config, jax.devices()[:1])
    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    start = time.perf_counter()
    state = {"s": jax.block_until_ready(model_fns.init_state(config, layout, optimizer, shardings))}
    init_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.n_vocab, (config.train_batch_size, config.n_ctx + 1), dtype=np.int32)
    inputs, labels = jax.numpy.asarray(tokens[:, :-1]), jax.numpy.asarray(tokens[:, 1:])
    start = time.perf_counter()
    train_step = model_fns.make_train_step(config, layout, optimizer, shardings).lower(
        state["s"], inputs, labels).compile()
    compile_seconds = time.perf_counter() - start

    def run_step():
        state["s"], metrics = train_step(state["s"], inputs, labels)
        metrics["loss"].block_until_ready()

    return run_step, {"init_seconds": init_seconds, "compile_seconds": compile_seconds}


def hf_runner(config):
    """One train step of Hugging Face's GPTNeoForCausalLM with AdamW, same shape and batch, run
    in a process of its own as its users run it: sharing one process would share one malloc
    heap, and each framework's freed blocks would fragment the other's (a neomesh step after a
    PyTorch step faulted in up to 900,000 fresh pages). The two processes still take turns."""
    import multiprocessing

    shape = {key: getattr(config, key) for key in ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head", "train_batch_size")}
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    worker = spawn.Process(target=_hf_worker, args=(theirs, shape, config.precision), daemon=True)
    worker.start()
    theirs.close()
    if ours.recv() != "ready":
        raise RuntimeError("the Hugging Face worker failed to start")

    def run_step():
        ours.send("step")
        ours.recv()

    return run_step


def _hf_worker(connection, shape: dict, precision: str) -> None:
    """precision bfloat16: the forward and backward under torch.autocast(bfloat16) with float32
    weights, as Hugging Face's Trainer trains with bf16=True on a CPU, and as neomesh's precision
    bfloat16 computes (bfloat16 products, float32 master weights)."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    hf_config = GPTNeoConfig(
        vocab_size=shape["n_vocab"], max_position_embeddings=shape["n_ctx"], hidden_size=shape["n_embd"],
        num_layers=shape["n_layer"], num_heads=shape["n_head"], attention_types=[[["global"], shape["n_layer"]]],
        intermediate_size=4 * shape["n_embd"], activation_function="gelu_new",
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
    )
    model = GPTNeoForCausalLM(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    tokens = torch.randint(0, shape["n_vocab"], (shape["train_batch_size"], shape["n_ctx"]))
    connection.send("ready")
    try:
        while connection.recv() == "step":
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            connection.send("done")
    except EOFError:  # the benchmark has finished and closed its end
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each, taking turns")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip_hf", action="store_true", help="only neomesh (e.g. on a GPU machine)")
    parser.add_argument("--no_probe", action="store_true", help="XLA's default options and CPU kernels, unprobed")
    args = parser.parse_args()

    import machine

    configs = {name: config_for(SHAPES[name], args.precision, "off" if args.no_probe else "auto")
               for name in args.shapes}
    machine.set_xla_dot_option(configs[args.shapes[-1]], decoding=False)  # before JAX starts its backend

    import jax

    import model_fns
    from metrics import matmul_roofline
    from models.kernels import uses_cpu_backward

    def measure_roofline():
        return matmul_roofline(2048 if jax.default_backend() == "cpu" else 8192,
                               dtype=jax.numpy.bfloat16 if args.precision == "bfloat16" else jax.numpy.float32)

    rooflines = [measure_roofline()]
    measured = {}
    for name in args.shapes:
        config = machine.tune(configs[name])
        tokens = config.train_batch_size * config.n_ctx
        run_ours, startup = neomesh_runner(config)
        runners = [run_ours] if args.skip_hf else [run_ours, hf_runner(config)]
        step_seconds = dict(zip(("neomesh", "hf"), time_alternating(runners, args.steps)))
        measured[name] = (config, tokens, step_seconds, startup)
    # the roofline is the best this machine did during the run: a busy moment must not inflate MFU
    rooflines.append(measure_roofline())
    roofline = max(rooflines)
    print(f"device: {jax.devices()[0].device_kind}; matmul roofline {roofline / 1e9:,.1f} GFLOP/s ({args.precision}; "
          f"best of {', '.join(f'{r / 1e9:,.0f}' for r in rooflines)} measured before and after)")
    results = {"roofline_gflops": roofline / 1e9, "device": jax.devices()[0].device_kind, "precision": args.precision}
    on_cpu, peak = jax.default_backend() == "cpu", None
    if on_cpu:
        results["machine"] = machine.describe(rates=True, xla_roofline=roofline if args.precision == "float32" else None)
        peak = results["machine"]["float32_peak_gflops"]
        print(f"machine: {json.dumps(results['machine'])}")
        if "note" in results["machine"]:
            print(f"note: {results['machine']['note']}")
    for name, (config, tokens, step_seconds, timings) in measured.items():
        ours = tokens / median(step_seconds["neomesh"])
        hf = tokens / median(step_seconds["hf"]) if "hf" in step_seconds else None
        mfu = ours * model_fns.flops_per_token(config) / roofline
        row = {"neomesh_tokens_per_sec": ours, "mfu_vs_roofline": mfu,
               "cpu_backward": "written" if uses_cpu_backward(config) else "plain", "attention_kernel": config.attention_kernel,
               "init_seconds": timings["init_seconds"], "compile_seconds": timings["compile_seconds"],
               "step_seconds": {runner: [round(t, 3) for t in times] for runner, times in step_seconds.items()}}
        peak_words = ""
        if peak and args.precision == "float32":
            row["mfu_vs_hardware_peak"] = ours * model_fns.flops_per_token(config) / (peak * 1e9)
            peak_words = f", {100 * row['mfu_vs_hardware_peak']:.1f}% of the CPU's float32 peak"
        line = (f"{name}: neomesh {ours:,.0f} tok/s, MFU {100 * mfu:.1f}% of roofline{peak_words} "
                f"(first step after {timings['init_seconds']:.1f} s init + {timings['compile_seconds']:.1f} s compile)")
        if hf is not None:
            row |= {"hf_tokens_per_sec": hf, "ratio": ours / hf}
            line += f" | HF GPTNeo (PyTorch) {hf:,.0f} tok/s | ratio {ours / hf:.2f}x"
        print(line, flush=True)
        results[name] = row
    print(json.dumps(results))


if __name__ == "__main__":
    from main import reuse_freed_memory

    reuse_freed_memory()  # as main.py does; Hugging Face's process inherits the same allocator setting
    main()
