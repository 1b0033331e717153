"""Faults a week-long run meets, on real parts: a disk that fills (a real tmpfs) during a checkpoint
save and during a metrics append, a kill during checkpoint rotation, an error inside the loop
while a save is in flight, a preemption signal, and a bucket that cannot be reached."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from conftest import xla_flags
from test_train import (
    REPO,
    TINY,
    assert_same_params,
    final_params,
    main_py,
    strict_rows,
    train_in_process,
    write_dataset,
)

from mesh import build_mesh_layout

# values that depend on the machine's speed, not on what was trained
TIMINGS = ("tokens_per_sec", "mfu")


def rows_without_timings(model_path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in strict_rows(model_path)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs, mounted for the test (the suite runs as root in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'}): the full-disk test "
                    "needs a real filesystem that fills")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `disk` with one file until `leave` bytes are free (0: full)."""
    filler = disk / f"filler-{time.monotonic_ns()}"
    stats = os.statvfs(disk)
    wanted = max(stats.f_bavail * stats.f_frsize - leave, 0)
    block = b"\0" * 2**20
    with open(filler, "wb", buffering=0) as f:
        try:
            while wanted > 0:
                wanted -= f.write(block[:min(len(block), wanted)] if leave else block)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_or_a_metrics_append_is_one_error_line_and_the_run_resumes_exactly(
        tmp_path, small_disk):
    import train
    from configs import load_config
    from errors import StorageError

    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    steps = ["train_steps=10", "iterations=1", "steps_per_checkpoint=3", "keep_checkpoints=2"]
    train_in_process(model_config, tmp_path / "reference", *steps)
    run = small_disk / "run"
    train_in_process(model_config, run, *steps, "train_steps=3")

    # 1. the disk fills while checkpoint 6 is written (in orbax's background thread)
    filler = fill(small_disk, leave=folder_bytes(run / "checkpoints" / "3") // 2)
    failed = main_py("--model", str(model_config), "--set", f"model_path={run}", "--set", "eval_steps=0",
                     *[arg for step in steps for arg in ("--set", step)], check=False)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    assert f"{run / 'checkpoints' / '6'}: could not write" in failed.stderr
    assert "the disk is full: free space there, then run the same command again" in failed.stderr
    assert "the newest complete checkpoint, step 3, is intact" in failed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["3"]
    filler.unlink()

    # 2. the disk fills between two metric rows: an append to metrics.jsonl or TensorBoard within the
    # next three rows needs a new page (log_grads makes each row about 1.4 KB), and fails
    def fill_at_step_4(step, values):
        if step == 4:
            fill(small_disk)

    config = load_config(str(model_config), [f"model_path={run}", "eval_steps=0", *steps, "steps_per_checkpoint=100",
                                             "log_grads=true"])
    with pytest.raises(StorageError, match="the disk is full: free space there") as refused:
        train.run(config, layout=build_mesh_layout(config, jax.devices()[:1]), sinks=[fill_at_step_4])
    assert str(refused.value).startswith((f"{run / 'metrics.jsonl'}: could not write",
                                          f"{run / 'tensorboard' / 'events.out.tfevents.'}"))
    for filler in small_disk.glob("filler-*"):
        filler.unlink()

    # 3. space freed: the same command resumes from step 3 and every row equals the uninterrupted run's
    resumed = train_in_process(model_config, run, *steps)
    assert (resumed.start_step, resumed.step) == (3, 10)
    assert rows_without_timings(run) == rows_without_timings(tmp_path / "reference")
    (params, step), (expected, _) = final_params(run, model_config), final_params(tmp_path / "reference", model_config)
    assert step == 10
    assert_same_params(params, expected, rtol=0)


@pytest.fixture(scope="module")
def rotated_run(tmp_path_factory):
    """Six steps, a checkpoint every two, keeping two: rotation has deleted step 2."""
    folder = tmp_path_factory.mktemp("rotation")
    model_config = write_dataset(folder, TINY["n_vocab"])
    train_in_process(model_config, folder / "run", "train_steps=6", "steps_per_checkpoint=2", "iterations=2",
                     "keep_checkpoints=2")
    return folder / "run", model_config


def test_rotation_keeps_the_newest_and_a_kill_midway_leaves_nothing_a_resume_trips_on(rotated_run, tmp_path, caplog):
    saved, model_config = rotated_run
    assert sorted(p.name for p in (saved / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    # what a kill leaves at either moment of a deletion: step 4 renamed aside whole, and another
    # renamed aside and half deleted (its meta and arrays gone, as rmtree goes)
    discarded = run / "checkpoints" / ".discarded"
    shutil.copytree(run / "checkpoints" / "4", discarded / "4-killed")
    shutil.copytree(run / "checkpoints" / "6", discarded / "6-killed")
    shutil.rmtree(discarded / "6-killed" / "meta")
    shutil.rmtree(discarded / "6-killed" / "params")
    shutil.rmtree(run / "checkpoints" / "4")
    with caplog.at_level("WARNING", logger="neomesh"):
        resumed = train_in_process(model_config, run, "train_steps=8", "steps_per_checkpoint=2", "iterations=2",
                                   "keep_checkpoints=2")
    assert (resumed.start_step, resumed.step) == (6, 8)
    assert "damaged" not in caplog.text and not (run / "damaged_checkpoints").exists()
    assert not discarded.exists() or not list(discarded.iterdir())  # the start deleted what the kill left
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "8"]


def test_an_error_inside_the_loop_waits_for_the_checkpoint_in_flight(rotated_run, tmp_path):
    """A sink that fails on the evaluation row of step 8 (evaluation runs while checkpoint 8 is
    written in the background): the error leaves train.run only once checkpoint 8 is complete."""
    import train
    from checkpoints import Checkpoints
    from configs import load_config

    saved, model_config = rotated_run
    run = tmp_path / "run"
    shutil.copytree(saved, run)

    def fail_on_evaluation(step, values):
        if "eval_loss" in values:
            raise RuntimeError(f"a sink failed at step {step}")

    config = load_config(str(model_config), [f"model_path={run}", "train_steps=10", "steps_per_checkpoint=2",
                                             "iterations=2", "eval_steps=1"])
    with pytest.raises(RuntimeError, match="a sink failed at step 8"):
        train.run(config, layout=build_mesh_layout(config, jax.devices()[:1]), sinks=[fail_on_evaluation])
    assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    checkpoints = Checkpoints(str(run), read_only=True)
    assert checkpoints.latest_step() == 8 and checkpoints.meta(8).step == 8
    checkpoints.close()


def test_resume_with_another_gradient_clipping_names_the_key_and_both_values(rotated_run, tmp_path):
    from errors import ConfigError

    saved, model_config = rotated_run
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    with pytest.raises(ConfigError) as refused:
        train_in_process(model_config, run, "train_steps=8", "gradient_clipping=0.0", "lr=3e-4")
    message = str(refused.value)
    assert "gradient_clipping: checkpoint 1.0, config 0.0" in message and "another shape" not in message
    assert "lr:" not in message  # a key that may change on resume is not blamed


def test_sigterm_stops_at_the_next_step_saves_and_exits_within_seconds(tmp_path):
    """A model whose step takes a few tenths of a second: from SIGTERM to exit, saving included; the
    next run resumes from the step the signal stopped at."""
    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    model_path = tmp_path / "run"
    process = main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--set", "n_layer=4",
                      "--set", "n_embd=128", "--set", "n_ctx=128", "--set", "train_batch_size=16",
                      "--set", "attention_types=[[[\"global\"], 4]]", "--set", "iterations=1",
                      "--set", "steps_per_checkpoint=100000", "--set", "train_steps=100000", "--set", "eval_steps=0",
                      background=True)
    metrics, deadline = model_path / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:
        time.sleep(0.1)
    rows = strict_rows(model_path)
    seconds_per_step = 1 / (rows[-1]["tokens_per_sec"] / (16 * 128))
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    delay = time.monotonic() - signalled
    assert process.returncode == 0, output
    saved = sorted(int(p.name) for p in (model_path / "checkpoints").iterdir() if p.name.isdigit())
    reached = strict_rows(model_path)[-1]["step"]
    assert saved == [reached] and f"stopped by a signal at step {reached}" in output
    assert delay < 10, f"{delay:.1f} s from SIGTERM to exit at {seconds_per_step:.2f} s per step"
    resumed = main_py("--model", str(model_config), "--set", f"model_path={model_path}", "--set", "n_layer=4",
                      "--set", "n_embd=128", "--set", "n_ctx=128", "--set", "train_batch_size=16",
                      "--set", "attention_types=[[[\"global\"], 4]]", "--set", "eval_steps=0",
                      "--set", f"train_steps={reached + 1}")
    assert f"at step {reached}" in resumed.stdout and strict_rows(model_path)[-1]["step"] == reached + 1


def test_sigterm_while_main_py_starts_loses_nothing_and_exits_cleanly(rotated_run, tmp_path):
    saved, model_config = rotated_run
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    process = main_py("--model", str(model_config), "--set", f"model_path={run}", "--set", "train_steps=8",
                      background=True)
    lock, deadline = run / "neomesh.lock", time.time() + 120
    while not (lock.exists() and lock.stat().st_size) and time.time() < deadline:  # JAX is up; no step has run
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "stopped by a signal before step 7; nothing new to save" in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]


def test_an_unreachable_bucket_is_one_error_line_within_seconds(tmp_path):
    from test_storage import free_port

    model_config = write_dataset(tmp_path, TINY["n_vocab"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORSTORE_", "GOOGLE_AUTH", "GCSFS_"))}
    env |= {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": xla_flags(1)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "main.py"), "--model", str(model_config),
                             "--set", "model_path=gs://neomesh-test/run"], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: gs://neomesh-test/run") and result.stderr.count("\n") == 1, result.stderr
    assert "cannot reach the storage endpoint" in result.stderr and "STORAGE_EMULATOR_HOST" in result.stderr
    assert seconds < 30, seconds
