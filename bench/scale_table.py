"""Memory and communication of GPT-Neo's published configs, each on its own mesh_shape and layout.

Each config is compiled ahead of time for its whole mesh (64 to 256 devices) by `train.compile_report`
(what `main.py --dry_run` prints), in a subprocess with that many simulated CPU devices; nothing is
allocated and no data is read. One markdown table row per config:

    python bench/scale_table.py --quick                       # gpt3_small_256 and gpt3_XL_256_Pile
    python bench/scale_table.py --configs gpt3_XL_256_Pile gpt3_2-7B_256
    python bench/scale_table.py                               # all of them (hours on a small machine)

Columns: per-device GiB of parameters, optimizer state (both exact, from the shardings) and
XLA:CPU's temporaries; the collectives' bytes per step on one device; the accelerator estimate
(README.md, dry-run section), and whether that fits a TPU v3 core (16 GiB, the generation of
GPT-Neo's 256-core slices) and a v2 core (8 GiB). The FSDP column is what the same devices would
need with the weights and optimizer state also sharded over the batch axis (MaxText-style FSDP):
compiled with `fsdp_axes` where configs.KEYS has that key, otherwise the estimate with the state
divided by the batch axis, plus one block's weights and gradient gathered whole (marked "est."). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG_DIR = REPO / "tests" / "gpt_neo_configs"  # GPT-Neo's own files, unchanged
CONFIGS = ("gpt3_small_256", "gpt3_medium_256", "gpt3_large_256", "gpt3_XL_256_Pile", "gpt3_2-7B_256",
           "gpt3_6-7B_256", "gpt3_13B_256", "gpt3_13B_256_Pile")
QUICK = ("gpt3_small_256", "gpt3_XL_256_Pile")
DEVICE_MEMORY = {"v3": 16 * 2**30, "v2": 8 * 2**30}  # HBM per TPU core
GIB = 2**30
MARK = "SCALE_TABLE_REPORT "


def one(name: str, overrides: list[str]) -> dict:
    """In the subprocess: compile `name` for its mesh on the simulated devices and return the report."""
    import train
    from configs import load_config
    from mesh import build_mesh_layout

    config = load_config(str(CONFIG_DIR / f"{name}.json"), ["eval_steps=0", *overrides])
    return train.compile_report(config, build_mesh_layout(config), stand_in=True) | {"parameters_layers": config.n_layer}


def devices_of(name: str) -> int:
    from configs import read_json

    mesh_shape = read_json(CONFIG_DIR / f"{name}.json")["mesh_shape"]
    return math.prod(int(part.split(":")[1]) for part in mesh_shape.split(","))


def run_one(name: str, overrides: list[str], timeout: float) -> dict:
    environment = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_of(name)}")
    command = [sys.executable, __file__, "--one", name, *(a for o in overrides for a in ("--set", o))]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no report within {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]}
    return json.loads(lines[-1][len(MARK):]) | {"wall_seconds": time.perf_counter() - start}


def fsdp_figure(name: str, report: dict, timeout: float) -> tuple[str, dict | None]:
    """The FSDP column: compiled with fsdp_axes over the batch axis where the key exists, else estimated."""
    from configs import KEYS

    batch_axis = report["layout"].get("batch")
    if batch_axis is None:
        return "-", None
    if "fsdp_axes" in KEYS:
        fsdp = run_one(name, [f"fsdp_axes={batch_axis}"], timeout)
        if "error" in fsdp:
            return f"error: {fsdp['error'][:60]}", fsdp
        return f"{fsdp['accelerator_estimate']['total'] / GIB:.1f}", fsdp
    estimate = report["accelerator_estimate"]
    state = report["per_device_parameter_bytes"] + report["per_device_optimizer_state_bytes"] + estimate["gradients"]
    # plus one block's weights and their gradient gathered whole over the batch axis while it runs
    gathered = 2 * report["per_device_parameter_bytes"] / report["parameters_layers"]
    total = state / report["mesh_shape"][batch_axis] + gathered + estimate["activations"]
    return f"{total / GIB:.1f} est.", {"estimated_total": total}


def row(name: str, report: dict, fsdp: str) -> str:
    if "error" in report:
        return f"| {name} | error: {report['error']} |"
    mesh = ",".join(f"{axis}:{size}" for axis, size in report["mesh_shape"].items())
    layout = ",".join(f"{dim}:{axis}" for dim, axis in report["layout"].items())
    sent = sum(figures["bytes"] for figures in report["collectives"].values())
    total = report["accelerator_estimate"]["total"]
    fits = " / ".join("yes" if total <= limit else "**no**" for limit in DEVICE_MEMORY.values())
    return (f"| {name} | {report['parameters'] / 1e6:,.0f}M | {mesh} | {layout} | "
            f"{report['per_device_parameter_bytes'] / GIB:.2f} | {report['per_device_optimizer_state_bytes'] / GIB:.2f} | "
            f"{report['per_device_temporary_bytes'] / GIB:.1f} | {sent / GIB:.2f} | {total / GIB:.1f} | {fits} | "
            f"{fsdp} | {report['compile_seconds']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="these configs (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of each config")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one config's compile may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        report = one(args.one, args.set)
        print(MARK + json.dumps(report, default=str), flush=True)
        return 0
    names = QUICK if args.quick else args.configs or CONFIGS
    print("| config | params | mesh | layout | params GiB/dev | opt state GiB/dev | XLA:CPU temps GiB/dev | "
          "collectives GiB/step/dev | accelerator estimate GiB/dev | fits v3 / v2 core | FSDP estimate GiB/dev | "
          "compile s |")
    print("|" + "---|" * 12)
    figures = {}
    for name in names:
        report = run_one(name, args.set, args.timeout)
        fsdp_text, fsdp = ("-", None) if "error" in report else fsdp_figure(name, report, args.timeout)
        print(row(name, report, fsdp_text), flush=True)
        figures[name] = report | {"fsdp": fsdp}
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
