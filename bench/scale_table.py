"""Memory and communication of GPT-Neo's published configs, each on its own mesh_shape and layout.

Each config is compiled ahead of time for its whole mesh (64 to 256 devices), in a subprocess with
that many simulated CPU devices; nothing is allocated and no data is read. By default only k and
2k of its layers are compiled (k whole periods of its layer pattern, at least two layers) and
every figure is extrapolated to n_layer (`layout_search.measure`, what `--auto_layout` ranks by);
`--whole` compiles every layer (`train.compile_report`, what `main.py --dry_run` prints), which
takes about as many times longer as the layers are more (gpt3_XL_256_Pile: 137 s against 19). One
markdown table row per config:

    python bench/scale_table.py --quick                       # gpt3_small_256 and gpt3_XL_256_Pile
    python bench/scale_table.py --configs gpt3_XL_256_Pile gpt3_2-7B_256
    python bench/scale_table.py                               # all of them

Columns: per-device GiB of parameters, optimizer state (both exact, from the shardings) and
XLA:CPU's temporaries; the collectives' bytes per step on one device; the accelerator estimate
(README.md, dry-run section), and whether that fits a TPU v3 core (16 GiB, the generation of
GPT-Neo's 256-core slices) and a v2 core (8 GiB). The FSDP column is the accelerator estimate of
the same devices with the weights and optimizer state also sharded over the batch axis
(`fsdp_axes`, MaxText-style FSDP), compiled. The last line printed is one JSON object with every
figure, per config, and under "machine" the CPU that compiled them (machine.py).
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


def one(name: str, overrides: list[str], whole: bool) -> dict:
    """In the subprocess: compile `name` for its mesh on the simulated devices and return its figures:
    by default with k and 2k of its layers (whole periods, at least two layers), extrapolated to n_layer (layout_search.measure;
    minutes where the whole model takes an hour), with --whole the whole model (train.compile_report)."""
    import jax

    import layout_search
    import train
    from configs import load_config
    from mesh import build_mesh_layout
    from models import gpt2

    config = load_config(str(CONFIG_DIR / f"{name}.json"), ["eval_steps=0", *overrides])
    layout = build_mesh_layout(config)
    if whole:
        report = train.compile_report(config, layout, stand_in=True)
        return report | {"accelerator_total": report["accelerator_estimate"]["total"],
                         "collective_bytes": sum(f["bytes"] for f in report["collectives"].values()),
                         "compiled_layers": [config.n_layer]}
    candidate = layout_search.Candidate(dict(layout.mesh.shape), dict(layout.layout), layout.fsdp_axes)
    figures = layout_search.measure(config, candidate, jax.devices(), stand_in=True)
    return {"parameters": gpt2.parameter_count(config), "mesh_shape": dict(layout.mesh.shape),
            "layout": dict(layout.layout), "per_device_parameter_bytes": figures["parameter_bytes"],
            "per_device_optimizer_state_bytes": figures["optimizer_state_bytes"],
            "per_device_temporary_bytes": figures["temporary_bytes"], "accelerator_total": figures["per_device_bytes"],
            "collective_bytes": sum(figures["collective_bytes"].values()), "collectives": figures["collective_bytes"],
            "compile_seconds": figures["compile_seconds"], "compiled_layers": figures["compiled_layers"]}


def devices_of(name: str) -> int:
    from configs import read_json

    mesh_shape = read_json(CONFIG_DIR / f"{name}.json")["mesh_shape"]
    return math.prod(int(part.split(":")[1]) for part in mesh_shape.split(","))


def run_one(name: str, overrides: list[str], timeout: float, whole: bool) -> dict:
    environment = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_of(name)}")
    command = [sys.executable, __file__, "--one", name, *(a for o in overrides for a in ("--set", o)),
               *(["--whole"] if whole else [])]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no report within {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]}
    return json.loads(lines[-1][len(MARK):]) | {"wall_seconds": time.perf_counter() - start}


def fsdp_figure(name: str, report: dict, overrides: list[str], timeout: float, whole: bool) -> tuple[str, dict | None]:
    """The FSDP column: the same config compiled with fsdp_axes over its batch axis."""
    batch_axis = report["layout"].get("batch")
    if batch_axis is None:
        return "-", None
    fsdp = run_one(name, [*overrides, f"fsdp_axes={batch_axis}"], timeout, whole)
    if "error" in fsdp:
        return f"error: {fsdp['error'][:60]}", fsdp
    return f"{fsdp['accelerator_total'] / GIB:.1f}", fsdp


def row(name: str, report: dict, fsdp: str) -> str:
    if "error" in report:
        return f"| {name} | error: {report['error']} |"
    mesh = ",".join(f"{axis}:{size}" for axis, size in report["mesh_shape"].items())
    layout = ",".join(f"{dim}:{axis}" for dim, axis in report["layout"].items())
    sent = report["collective_bytes"]
    total = report["accelerator_total"]
    fits = " / ".join("yes" if total <= limit else "**no**" for limit in DEVICE_MEMORY.values())
    return (f"| {name} | {report['parameters'] / 1e6:,.0f}M | {mesh} | {layout} | "
            f"{report['per_device_parameter_bytes'] / GIB:.2f} | {report['per_device_optimizer_state_bytes'] / GIB:.2f} | "
            f"{report['per_device_temporary_bytes'] / GIB:.1f} | {sent / GIB:.2f} | {total / GIB:.1f} | {fits} | "
            f"{fsdp} | {report['compile_seconds']:.0f} ({'+'.join(map(str, report['compiled_layers']))}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, help="these configs (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of each config")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one config's compile may take")
    parser.add_argument("--whole", action="store_true",
                        help="compile every layer (default: k and 2k of them, extrapolated)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        report = one(args.one, args.set, args.whole)
        print(MARK + json.dumps(report, default=str), flush=True)
        return 0
    names = QUICK if args.quick else args.configs or CONFIGS
    print("| config | params | mesh | layout | params GiB/dev | opt state GiB/dev | XLA:CPU temps GiB/dev | "
          "collectives GiB/step/dev | accelerator estimate GiB/dev | fits v3 / v2 core | FSDP estimate GiB/dev | "
          "compile s |")
    print("|" + "---|" * 12)
    figures = {}
    for name in names:
        report = run_one(name, args.set, args.timeout, args.whole)
        fsdp_text, fsdp = (("-", None) if "error" in report else
                           fsdp_figure(name, report, args.set, args.timeout, args.whole))
        print(row(name, report, fsdp_text), flush=True)
        figures[name] = report | {"fsdp": fsdp}
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU that compiled them, also on a GPU host
    import machine

    figures["machine"] = machine.describe()  # compile times and XLA:CPU's temporaries depend on it
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
