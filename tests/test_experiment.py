"""run_experiment.py on real parts: real sacred runs (file observer, and the Mongo observer against
mongomock, since no MongoDB server can be installed here) around real main.py training processes,
and a heartbeat restart provoked by pausing the training process with SIGSTOP."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import xla_flags
from test_train import REPO, SHARED_COMPILATION, TINY, train_tiny_tokenizer, write_dataset

import run_experiment

# what a training process sees: one CPU device (the tests' own 8 would change the mesh)
CHILD_ENV = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", **SHARED_COMPILATION}
# figures that measure the machine's speed, not what was trained
TIMINGS = ("tokens_per_sec", "mfu")
STEPS, CHECKPOINT_EVERY = 24, 8


def experiment_model(folder: Path) -> Path:
    """write_dataset's tiny model and shards, with a real tokenizer (so that --predict can decode),
    a metric row every step, and a checkpoint (and evaluation) every CHECKPOINT_EVERY steps."""
    model = write_dataset(folder, n_vocab=300)
    train_tiny_tokenizer(["def run(config):\n    return config.train_steps\n" * 40], folder / "tok.json",
                         ["<|endoftext|>", "<|padding|>"])
    dataset = folder / "dataset_configs" / "tiny.json"
    dataset.write_text(json.dumps({**json.loads(dataset.read_text()), "tokenizer_path": str(folder / "tok.json")}))
    values = {**json.loads(model.read_text()), "n_vocab": 300, "train_steps": STEPS, "iterations": 1,
              "steps_per_checkpoint": CHECKPOINT_EVERY, "predict_max_steps": 6, "keep_checkpoints": 2}
    model.write_text(json.dumps(values))
    return model


def sacred_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {name: dict(zip(m["steps"], m["values"])) for name, m in metrics.items()}


def jsonl_rows(model_path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (model_path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One sacred run recorded by both observers (MongoDB being mongomock), then a --predict run on
    its model_path: what the tests below read."""
    import gridfs
    import mongomock
    import mongomock.gridfs
    import pymongo

    root = tmp_path_factory.mktemp("experiment")
    model = experiment_model(root)
    model_path = root / "run"
    argv = ["--model", str(model), "--set", f"model_path={model_path}", "--experiment_name", "tiny",
            "--mongo", "mongodb://localhost:27017/neomesh"]
    mongomock.gridfs.enable_gridfs_integration()
    with pytest.MonkeyPatch.context() as env, mongomock.patch(servers=(("localhost", 27017),)):
        for key, value in CHILD_ENV.items():
            env.setenv(key, value)
        trained = run_experiment.run(argv)
        (root / "prompt.txt").write_text("def run")
        predicted = run_experiment.run([*argv, "--predict", "--prompt", str(root / "prompt.txt")])
        database = pymongo.MongoClient("mongodb://localhost:27017")["neomesh"]
        mongo = {"runs": list(database.runs.find({})), "metrics": list(database.metrics.find({})),
                 "files": {f.filename: f.read() for f in gridfs.GridFS(database).find({})}}
    return {"model": model, "model_path": model_path, "codes": (trained, predicted), "mongo": mongo}


@pytest.mark.slow
def test_a_sacred_run_records_config_metrics_artifacts_and_the_predictions_it_names(tracked):
    assert tracked["codes"] == (0, 0)
    runs = tracked["model_path"] / "sacred"
    run = json.loads((runs / "1" / "run.json").read_text())
    assert run["status"] == "COMPLETED" and run["experiment"]["name"] == "tiny" and run["result"] == {"restarts": 0}
    config = json.loads((runs / "1" / "config.json").read_text())
    written = json.loads(tracked["model"].read_text())
    assert {k: config[k] for k in written} == written  # the sacred config is the neomesh config
    assert config["model_path"] == str(tracked["model_path"])

    # every metric row of the training process reached sacred, at its step, with its value
    logged = sacred_metrics(runs / "1")
    rows = jsonl_rows(tracked["model_path"])
    for name in ("loss", "cross_entropy", "lr", "eval_loss"):
        expected = {row["step"]: row[name] for row in rows if name in row}
        assert logged[name] == pytest.approx(expected, rel=1e-12), name
    assert sorted(logged["loss"]) == list(range(1, STEPS + 1))
    assert sorted(logged["eval_loss"]) == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    assert set(logged["tokens_per_sec"]) == set(logged["loss"]) and all(v > 0 for v in logged["tokens_per_sec"].values())
    assert set(logged["mfu"]) == set(logged["loss"])

    assert set(run["artifacts"]) == {"loss_curve.png", "metrics.jsonl"}
    assert (runs / "1" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert f"step {STEPS}/{STEPS} | loss" in (runs / "1" / "cout.txt").read_text()  # the training process's output

    # the --predict run is sacred run 2; its id names the predictions file, which it attaches
    predicted = json.loads((runs / "2" / "run.json").read_text())
    assert predicted["status"] == "COMPLETED"
    predictions = tracked["model_path"] / f"predictions_2_{STEPS}.txt"
    assert "SAMPLE 0" in predictions.read_text()
    assert f"predictions_2_{STEPS}.txt" in predicted["artifacts"]
    assert (runs / "2" / predictions.name).read_text() == predictions.read_text()


@pytest.mark.slow
def test_the_mongo_observer_records_the_same_run(tracked):
    runs = {run["_id"]: run for run in tracked["mongo"]["runs"]}
    assert set(runs) == {1, 2} and runs[1]["status"] == runs[2]["status"] == "COMPLETED"
    assert runs[1]["config"]["n_embd"] == TINY["n_embd"] and runs[1]["experiment"]["name"] == "tiny"
    metrics = {(m["run_id"], m["name"]): dict(zip(m["steps"], m["values"])) for m in tracked["mongo"]["metrics"]}
    assert metrics[(1, "loss")] == sacred_metrics(tracked["model_path"] / "sacred" / "1")["loss"]
    files = tracked["mongo"]["files"]
    predictions = tracked["model_path"] / f"predictions_2_{STEPS}.txt"
    assert files[f"artifact://runs/2/{predictions.name}"] == predictions.read_bytes()
    assert files["artifact://runs/1/loss_curve.png"][:4] == b"\x89PNG"


def last_logged_step(model_path: Path) -> int:
    try:
        complete = (model_path / "metrics.jsonl").read_text().rsplit("\n", 2)  # the last line may be half-written
        return json.loads(complete[-2])["step"] if len(complete) >= 2 else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return 0


@pytest.mark.slow
def test_eval_hands_its_figures_to_the_metric_sinks(tracked):
    import math

    import main
    from configs import load_config

    args = main.parse_args(["--model", str(tracked["model"]), "--set", f"model_path={tracked['model_path']}", "--eval"])
    rows = []
    assert main.run(args, load_config(args.model, main.config_overrides(args)), [lambda *row: rows.append(row)]) == 0
    [(step, figures)] = rows
    assert step == STEPS and set(figures) == {"eval_loss", "eval_perplexity", "eval_bits_per_byte"}
    assert figures["eval_perplexity"] == pytest.approx(math.exp(figures["eval_loss"]), rel=1e-9)
    # the same batches as the evaluation that training ran at its last checkpoint
    trained = [row["eval_loss"] for row in jsonl_rows(tracked["model_path"]) if row["step"] == STEPS and "eval_loss" in row]
    assert figures["eval_loss"] == pytest.approx(trained[0], rel=1e-4)


def lines_of(process: subprocess.Popen, into: list[str]) -> threading.Thread:
    def read():
        for line in process.stdout:
            into.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


@pytest.mark.slow
def test_a_silent_training_process_is_restarted_from_its_checkpoint_and_ends_with_the_uninterrupted_losses(
        tracked, tmp_path):
    model_path = tmp_path / "run"
    command = [sys.executable, str(REPO / "run_experiment.py"), "--model", str(tracked["model"]), "--set",
               f"model_path={model_path}", "--experiment_name", "paused", "--heartbeat_timeout", "4",
               "--initial_heartbeat_timeout", "120"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = lines_of(process, output)
    try:
        # pause the training process for real once it has saved its first checkpoint and trains on
        deadline, paused = time.time() + 120, None
        while time.time() < deadline and paused is None and process.poll() is None:
            started = [m for line in output if (m := re.search(r"training process (\d+) started", line))]
            if started and last_logged_step(model_path) > CHECKPOINT_EVERY:
                paused = int(started[0].group(1))
                os.kill(paused, signal.SIGSTOP)
            time.sleep(0.001)
        assert paused is not None, "".join(output)
        assert process.wait(240) == 0, "".join(output)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(5)
    text = "".join(output)
    restarts = [line for line in output if "no new metric for 4 s" in line]
    assert len(restarts) == 1 and f"stopped training process {paused}" in restarts[0], text
    assert "restart 1 of 5" in restarts[0] and "resumed from" in text

    run_dir = model_path / "sacred" / "1"
    assert json.loads((run_dir / "run.json").read_text())["result"] == {"restarts": 1}
    # the finished run is the uninterrupted one: metrics.jsonl row for row, and what sacred logged
    restarted, straight = jsonl_rows(model_path), jsonl_rows(tracked["model_path"])
    assert [row["step"] for row in restarted] == [row["step"] for row in straight]
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(restarted, straight))
    uninterrupted = sacred_metrics(tracked["model_path"] / "sacred" / "1")
    for name in ("loss", "cross_entropy", "lr", "eval_loss"):
        assert sacred_metrics(run_dir)[name] == pytest.approx(uninterrupted[name], rel=1e-6), name


def run_in_process(argv: list[str], capsys, caplog) -> tuple[int, str, str]:
    """run_experiment.run(argv) in this process, its training processes on one CPU device:
    (exit code, its log lines, its stderr)."""
    caplog.set_level(logging.INFO, logger="neomesh")
    with pytest.MonkeyPatch.context() as env:
        for key, value in CHILD_ENV.items():
            env.setenv(key, value)
        code = run_experiment.run(argv)
    return code, caplog.text, capsys.readouterr().err


@pytest.mark.slow
def test_a_config_error_in_the_training_process_fails_the_sacred_run_with_its_one_error_line(
        tracked, tmp_path, capsys, caplog):
    model_path = tmp_path / "run"
    code, logged, stderr = run_in_process(
        ["--model", str(tracked["model"]), "--set", f"model_path={model_path}", "--set",
         'datasets=[["nowhere", 1, "documents_random", 1.0]]', "--experiment_name", "broken"], capsys, caplog)
    assert code == 2, logged + stderr
    assert stderr.count("error: ") == 1 and "Traceback" not in stderr and "'nowhere'" in stderr, stderr
    run = json.loads((model_path / "sacred" / "1" / "run.json").read_text())
    assert run["status"] == "FAILED" and "'nowhere'" in "".join(run["fail_trace"])
    assert "sacred run FAILED" in logged


@pytest.mark.slow
def test_a_training_process_that_never_reports_is_stopped_and_restarted_at_most_max_restarts_times(
        tracked, tmp_path, capsys, caplog):
    model_path = tmp_path / "run"
    code, logged, stderr = run_in_process(
        ["--model", str(tracked["model"]), "--set", f"model_path={model_path}", "--experiment_name", "mute",
         "--initial_heartbeat_timeout", "1", "--max_restarts", "1", "--stop_grace", "0.2"], capsys, caplog)
    assert code == 1, logged + stderr
    started = re.findall(r"training process (\d+) started", logged)
    # a process still starting dies of SIGTERM; one that already keeps SIGTERM for its loop cannot
    # save within 0.2 s and is killed
    killed = re.findall(r"training process (\d+) did not exit within 0.2 s of SIGTERM: SIGKILL", logged)
    assert len(started) == 2 and set(killed) <= set(started), logged
    assert logged.count("no new metric for 1 s") == 1 and "restart 1 of 1" in logged
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"training process {started[1]} sent no metric row for 1 s" in errors[0], stderr
    assert "--max_restarts" in errors[0]
    assert json.loads((model_path / "sacred" / "1" / "run.json").read_text())["status"] == "FAILED"


def test_wrapper_flags_and_heartbeat_values_are_refused_on_the_command_line(capsys):
    for argv, message in [(["--sacred_id", "7"], "--sacred_id is set by run_experiment.py"),
                          (["--heartbeat_timeout", "0"], "--heartbeat_timeout 0.0: must be a positive number"),
                          ([], "the following arguments are required: --experiment_name")]:
        with pytest.raises(SystemExit) as stopped:
            run_experiment.parse_args(["--model", "model.json", *argv,
                                       *(["--experiment_name", "x"] if argv else [])])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_tensorboard_starts_on_a_free_port_or_says_how_to_install_it(tmp_path, capsys):
    import importlib.util
    import urllib.request

    server = run_experiment.start_tensorboard(str(tmp_path))
    printed = capsys.readouterr().out
    if importlib.util.find_spec("tensorboard") is None:
        assert server is None
        assert "tensorboard package is not installed" in printed and "pip install tensorboard" in printed
        assert f"tensorboard --logdir {tmp_path}" in printed
        return
    try:
        url = re.search(r"TensorBoard: (http://localhost:\d+/)", printed).group(1)
        deadline = time.time() + 60
        while True:
            try:
                assert urllib.request.urlopen(url, timeout=5).status == 200
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "TensorBoard did not answer"
                time.sleep(0.5)
    finally:
        server.terminate()


def test_new_empties_model_path_before_sacred_records_into_it_and_asks_first(tmp_path):
    from errors import ConfigError

    model_path = tmp_path / "run"
    (model_path / "checkpoints").mkdir(parents=True)
    (model_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="pass --yes"):  # no terminal here to ask on
        run_experiment.start_afresh(str(model_path), assume_yes=False)
    assert (model_path / "metrics.jsonl").exists()
    run_experiment.start_afresh(str(model_path), assume_yes=True)
    assert not model_path.exists() or not list(model_path.iterdir())
    _, _, passed = run_experiment.parse_args(["--model", "m.json", "--experiment_name", "x", "--new", "--yes",
                                              "--set", "train_steps=3"])
    assert passed == ["--model", "m.json", "--set", "train_steps=3"]  # the training process never deletes
