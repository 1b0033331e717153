"""main.py --dry_run at a mesh's real scale: simulated devices set up by main.py itself, per-device
bytes from the layout, collectives from the compiled HLO, --device_memory and --topology."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from test_layout import compiled_step_text
from test_train import SHARED_COMPILATION, write_dataset

import step_report
from configs import load_config
from errors import ConfigError
from models import gpt2

REPO = Path(__file__).resolve().parent.parent
GPT_NEO = Path(__file__).resolve().parent / "gpt_neo_configs"


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20),
                                           ("1.5gib", 3 * 2**29), ("4096", 4096)])
def test_device_memory_sizes_read_in_binary_and_decimal_units(text, expected):
    assert step_report.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16 gigs", "-1GiB", "0GB", "GiB", "sixteen"])
def test_a_device_memory_that_is_no_size_is_one_line_naming_it(text, capsys):
    import main

    assert main.main(["--model", "demo", "--dry_run", f"--device_memory={text}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device_memory {text!r}: expected a positive size"), lines
    with pytest.raises(ConfigError):
        step_report.parse_memory(text)


def test_topology_without_libtpu_is_one_line_saying_libtpu_is_needed(capsys):
    import importlib.util

    import main

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed here")
    assert main.main(["--model", "demo", "--dry_run", "--topology", "v3-256"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --topology v3-256: compiling for a TPU topology needs "
                                                   "the TPU compiler (the libtpu package"), lines


def test_data_parallel_gradients_are_one_all_reduce_over_the_batch_axis_of_their_bytes():
    """batch:x on an x:4,y:2 mesh: each step sums every float32 gradient over x, and y (which splits
    nothing) sends nothing; the loss and its scalars add a few bytes."""
    config = load_config("demo", ["n_layer=1", 'attention_types=[[["global"],1]]', "n_embd=32", "n_head=4",
                                  "n_ctx=16", "n_vocab=64", "train_batch_size=8", "mesh_shape=x:4,y:2",
                                  "layout=batch:x"])
    found = step_report.collectives(compiled_step_text(config), {"x": 4, "y": 2})
    gradient_bytes = sum(4 * math.prod(leaf.shape) for leaf in jax.tree.leaves(gpt2.param_shapes(config)))
    assert {axes for _, axes in found} == {"x"}, found
    sent = found[("all-reduce", "x")]["bytes"]
    assert gradient_bytes <= sent <= gradient_bytes + 256, (sent, gradient_bytes)


def layout_parameter_bytes(config) -> int:
    """Float32 parameter bytes on one device: each weight over the mesh axes its dimensions map to."""
    mesh = dict(part.split(":") for part in config.mesh_shape.split(","))
    layout = dict(part.split(":") for part in config.layout.split(","))
    total = 0
    for weight in jax.tree.leaves(gpt2.weights(config), is_leaf=gpt2.is_weight):
        split = math.prod(int(mesh[layout[dim]]) for dim in weight.dims if dim in layout)
        total += math.prod(gpt2.shape_of(weight, config)) * 4 / split
    return int(total)


def dry_run_through_main_py(model: str, *sets: str, timeout: float = 600) -> str:
    """main.py --dry_run in a process that is not told a device count: main.py sets it."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **SHARED_COMPILATION}
    command = [sys.executable, str(REPO / "main.py"), "--model", model, "--dry_run",
               *(a for s in sets for a in ("--set", s))]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def reported_bytes(output: str, row: str) -> int:
    return int(re.search(rf"^\s+{re.escape(row)}\s+[0-9.]+ GiB \(([0-9,]+) B\)", output, re.M).group(1).replace(",", ""))


@pytest.mark.slow
def test_dry_run_simulates_the_mesh_and_reports_the_layouts_parameter_bytes(tmp_path):
    """GPT-Neo XL's layout (batch:x, memory_length:y, embd:y) on 64 simulated devices, at a small width."""
    model = write_dataset(tmp_path, 256)
    values = json.loads(model.read_text()) | {
        "n_layer": 2, "n_embd": 64, "n_head": 4, "n_ctx": 32, "n_vocab": 256, "train_batch_size": 32,
        "attention_types": [[["global"], 2]], "mesh_shape": "x:32,y:2", "layout": "batch:x,memory_length:y,embd:y",
        "recompute_grad": True, "precision": "bfloat16", "eval_steps": 0, "model_path": str(tmp_path / "run")}
    model.write_text(json.dumps(values))
    output = dry_run_through_main_py(str(model))
    assert "64 simulated CPU devices stand in" in output and "mesh: {'x': 32, 'y': 2}" in output
    expected = layout_parameter_bytes(load_config(str(model)))
    assert abs(reported_bytes(output, "parameters") - expected) <= 0.01 * expected
    assert reported_bytes(output, "optimizer state") >= 2 * expected  # Adam's two moments, sharded alike
    assert "XLA:CPU compiled this step" in output and "accelerator estimate: total" in output
    assert re.search(r"all-reduce over x\s+\d+ ops", output), output


@pytest.mark.slow
@pytest.mark.scale
@pytest.mark.skipif(os.environ.get("NEOMESH_SCALE_TESTS") != "1", reason="minutes of compiling: NEOMESH_SCALE_TESTS=1")
def test_gpt_neo_xl_on_256_simulated_devices_reports_its_layouts_parameter_bytes():
    """GPT-Neo's own XL file, through bench/scale_table.py (which skips the dataset check: its shards
    are in GPT-Neo's bucket)."""
    command = [sys.executable, str(REPO / "bench" / "scale_table.py"), "--configs", "gpt3_XL_256_Pile"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=7200,
                            env={**os.environ, **SHARED_COMPILATION})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])["gpt3_XL_256_Pile"]
    assert report["mesh_shape"] == {"x": 128, "y": 2}
    expected = layout_parameter_bytes(load_config(str(GPT_NEO / "gpt3_XL_256_Pile.json")))
    assert abs(report["per_device_parameter_bytes"] - expected) <= 0.01 * expected
