"""Two local processes (jax.distributed over gloo, two simulated CPU devices each) running main.py
itself train exactly what one process with all four devices trains: every step's loss, the
evaluation, and checkpoints that the other process count resumes."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import xla_flags
from test_train import REPO, SHARED_COMPILATION, TINY, tiny_flops_per_token, write_dataset

pytestmark = pytest.mark.slow


def environment(devices: int) -> dict:
    import os

    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
            **SHARED_COMPILATION}


def one_process(*args: str, devices: int = 4) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], env=environment(devices), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_two_processes(*args: str) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, str(REPO / "main.py"), *args, "--coordinator_address",
                              f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                             env=environment(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def two_processes(*args: str, check: bool = True) -> list[tuple[int, str]]:
    workers = start_two_processes(*args)
    results = []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=300)
        finally:
            for other in workers:
                if other.poll() is None and worker.returncode is None:
                    other.kill()
        results.append((worker.returncode, out))
    if check:
        for code, out in results:
            assert code == 0, out[-3000:]
    return results


def metric(model_path: Path, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (model_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row[name] for row in rows if name in row}


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    # iterations 1: metrics.jsonl holds every step's own loss; dropout on (write_dataset), so the
    # masks must agree across process counts too
    return write_dataset(tmp_path_factory.mktemp("multihost"), TINY["n_vocab"])


def sets(model_path: Path, *keys: str) -> list[str]:
    return ["--set", f"model_path={model_path}", "--set", "iterations=1", "--set", "steps_per_checkpoint=2",
            *(part for key in keys for part in ("--set", key))]


def test_two_processes_data_parallel_equal_one_process_and_checkpoints_resume_across_process_counts(
        model_config, tmp_path):
    """Empty mesh_shape: data parallel over all four devices of both processes; and a one-process
    checkpoint continued by two processes with heads split between them (the mesh's first axis
    runs across the processes, each holding two consecutive devices; the batch within each).
    MFU: against peak_flops per device, two processes' equals one's at equal speed; against the
    measured rooflines, the two hosts' own are summed."""
    reference, two_then_one, one_then_two = tmp_path / "reference", tmp_path / "two_then_one", tmp_path / "one_then_two"
    one_process("--model", str(model_config), *sets(reference, "train_steps=4", "peak_flops=1e9"))
    two_processes("--model", str(model_config), *sets(two_then_one, "train_steps=2", "peak_flops=1e9"))
    one_process("--model", str(model_config), *sets(two_then_one, "train_steps=4", "peak_flops=1e9"))
    # one process's checkpoint at step 2 (its step 4 removed), continued by two processes
    shutil.copytree(reference, one_then_two)
    shutil.rmtree(one_then_two / "checkpoints" / "4")
    (_, measured), _ = two_processes("--model", str(model_config), *sets(one_then_two, "train_steps=4",
                                                                         "mesh_shape=x:2,y:2", "layout=batch:y,heads:x"))

    expected = metric(reference, "loss")
    assert sorted(expected) == [1, 2, 3, 4]
    for run, tolerance in ((two_then_one, 1e-6), (one_then_two, 1e-5)):  # another layout: another summation order
        losses = metric(run, "loss")
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in expected.items():
            assert loss == pytest.approx(losses[step], rel=tolerance, abs=0), (run.name, step)
        evals = metric(run, "eval_loss")
        for step, loss in metric(reference, "eval_loss").items():
            assert loss == pytest.approx(evals[step], rel=tolerance, abs=0), (run.name, "eval", step)

    def mfu_over_speed(run: Path) -> dict[int, float]:  # mfu / tokens_per_sec = FLOPs per token / the peak
        return {step: mfu / metric(run, "tokens_per_sec")[step] for step, mfu in metric(run, "mfu").items()}

    one = mfu_over_speed(reference)
    two = mfu_over_speed(two_then_one)
    for step in (1, 2):  # two_then_one's steps on two processes
        assert two[step] == pytest.approx(one[step], rel=1e-6, abs=0)
        assert one[step] == pytest.approx(tiny_flops_per_token() / (1e9 * 4), rel=1e-6)
    hosts = re.search(r"measured matmul roofline of each host, summed \(([0-9.e+]+) \+ ([0-9.e+]+) FLOP/s\)", measured)
    assert hosts, measured[-3000:]
    summed = float(hosts[1]) + float(hosts[2])
    for step in (3, 4):  # one_then_two's steps on two processes
        assert mfu_over_speed(one_then_two)[step] == pytest.approx(tiny_flops_per_token() / summed, rel=1e-6)


def test_a_global_batch_the_processes_devices_do_not_divide_is_one_clear_error_on_each(model_config, tmp_path):
    results = two_processes("--model", str(model_config), *sets(tmp_path / "run", "train_batch_size=6"), check=False)
    for code, out in results:
        assert code == 2, out[-3000:]
        assert "Traceback" not in out
        assert "train_batch_size 6 does not divide evenly by 4" in out


def test_when_one_process_dies_the_other_stops_within_the_peer_timeout_with_a_message(model_config, tmp_path):
    import signal
    import time

    workers = start_two_processes("--model", str(model_config), "--peer_timeout", "5",
                                  *sets(tmp_path / "run", "train_steps=100000", "eval_steps=0"))
    try:
        for line in workers[0].stdout:  # training, with a checkpoint saved
            if line.startswith("step 3/"):
                break
        workers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, _ = workers[0].communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    assert workers[0].returncode == 3, out[-3000:]
    assert "error: process 1 of 2 has given no sign of life" in out and "Traceback" not in out
    assert waited < 30, waited
    # every process started again (here: one, on as many devices) resumes from the newest checkpoint
    saved = max(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    resumed = one_process("--model", str(model_config), *sets(tmp_path / "run", f"train_steps={saved + 1}",
                                                              "eval_steps=0"))
    assert f"at step {saved}" in resumed.stdout and f"step {saved + 1}/{saved + 1}" in resumed.stdout


def test_eval_and_predict_on_two_processes_print_what_one_process_prints(tmp_path):
    """--eval and --predict of a checkpoint, data parallel over both processes' devices: process 0
    prints the loss and the samples of one process with as many devices, and the other prints none."""
    import jax
    from test_export import perturbed_params, save_checkpoint
    from test_train import train_tiny_tokenizer

    from configs import load_config
    from tfrecord import write_shard

    corpus = ["every process holds two devices", "the batch is split across the processes"] * 20
    tokenizer = train_tiny_tokenizer(corpus, tmp_path / "tokenizer.json", ["<|endoftext|>"])
    (tmp_path / "shards").mkdir()
    write_shard(str(tmp_path / "shards" / "words_0_40.tfrecords"), [tokenizer.encode(t).ids + [0] for t in corpus])
    (tmp_path / "dataset_configs").mkdir()
    (tmp_path / "dataset_configs" / "words.json").write_text(json.dumps({
        "n_vocab": 300, "path": str(tmp_path / "shards" / "*.tfrecords"), "eos_id": 0,
        "tokenizer_path": str(tmp_path / "tokenizer.json")}))
    config_file = tmp_path / "words.json"
    config_file.write_text(json.dumps({
        **TINY, "n_vocab": 300, "datasets": [["words", 2, "documents_random", 1.0]], "mesh_shape": "", "layout": "",
        "model_path": str(tmp_path / "model"), "eval_steps": 2, "eval_batch_size": 4, "predict_batch_size": 4,
        "predict_max_steps": 8}))
    config = load_config(str(config_file))
    with jax.default_device(jax.devices()[0]):
        save_checkpoint(config, perturbed_params(config, seed=3), step=7)
    (tmp_path / "prompt.txt").write_text("the batch is")

    for mode in (["--eval"], ["--predict", "--prompt", str(tmp_path / "prompt.txt")]):
        alone = one_process("--model", str(config_file), *mode).stdout
        (first, out0), (second, out1) = two_processes("--model", str(config_file), *mode)
        printed = [line for line in alone.splitlines() if line.startswith(("step 7 |", "=", "prompt ("))]
        assert printed, alone[-3000:]
        assert [line for line in out0.splitlines() if line in printed] == printed, (mode, out0[-3000:])
        assert not any(line.startswith(("step 7 |", "prompt (")) for line in out1.splitlines()), out1[-3000:]
    samples = (tmp_path / "model" / "predictions_nosacred_7.txt").read_text()
    assert samples.count(" SAMPLE ") == 4 and samples in alone
