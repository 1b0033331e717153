"""A sacred-tracked run of main.py, with GPT-Neo's run_experiment.py command line.

    python run_experiment.py --model gpt3_small --experiment_name x
    python run_experiment.py --model gpt3_small --experiment_name x --mongo mongodb://host:27017/neomesh
    python run_experiment.py --model gpt3_small --experiment_name x --predict --prompt p.txt

Every main.py flag is accepted and handed to the training process (`--tpu`, `--gpu_ids`,
`--set key=value`, `--eval`, `--predict`, `--auto_layout`, ...). On top of them:

- **sacred.** A `FileStorageObserver` records the run under `model_path/sacred/<id>/` (config.json,
  run.json with the status, metrics.json, cout.txt, artifacts); with `--mongo URL` (or
  `NEOMESH_MONGO`) a `MongoObserver` records it as well, for omniboard. The sacred config is the
  neomesh config. Every metric row the training loop produces (loss, cross_entropy, lr,
  tokens_per_sec, mfu, eval_loss, ...) reaches sacred as it is produced: the training process
  writes it to a pipe (main.py `--metrics_fd`, a metrics.LineSink) and `SacredSink` logs it. The
  loss curve, metrics.jsonl and the prediction files are attached as artifacts; the sacred run id
  names the prediction files (`predictions_<id>_<step>.txt`).
- **A heartbeat.** Training runs in a child process. When no metric row arrives within
  `--initial_heartbeat_timeout` seconds of its start, or `--heartbeat_timeout` seconds of the last
  row, it is stopped (SIGTERM, then SIGKILL after `--stop_grace` seconds) and started again,
  resuming from its last checkpoint; at most `--max_restarts` times, one log line each.
- **`--tensorboard`** starts TensorBoard over model_path on a free port and prints its URL (the
  `tensorboard` package is optional: `pip install tensorboard`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import main as neomesh_main
import storage
from errors import USER_ERROR_EXIT_CODE, USER_ERRORS, ConfigError, report_user_error

log = logging.getLogger("neomesh")

REPO_DIR = Path(__file__).resolve().parent
MAIN_PY = REPO_DIR / "main.py"
# main.py flags the wrapper sets itself for the training process
WRAPPER_FLAGS = ("--sacred_id", "--metrics_fd")


def experiment_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The flags run_experiment.py adds to main.py's."""
    parser = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False)
    parser.add_argument("--experiment_name", required=True, help="the sacred experiment's name")
    parser.add_argument("--initial_heartbeat_timeout", type=float, default=7200.0, metavar="SECONDS",
                        help="restart the training process if its first metric row takes longer (default 7200)")
    parser.add_argument("--heartbeat_timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="restart it if no new metric row arrives for this long (default 1800)")
    parser.add_argument("--max_restarts", type=int, default=5,
                        help="heartbeat restarts before the run is given up as FAILED (default 5)")
    parser.add_argument("--stop_grace", type=float, default=60.0, metavar="SECONDS",
                        help="after SIGTERM, how long a silent training process may take to save and exit "
                             "before SIGKILL (default 60)")
    parser.add_argument("--mongo", default=os.environ.get("NEOMESH_MONGO"), metavar="URL",
                        help="also record the run in MongoDB, e.g. mongodb://host:27017/neomesh (the database is "
                             "the URL's path, default sacred); default: $NEOMESH_MONGO")
    parser.add_argument("--sacred_dir", help="the file observer's folder (default model_path/sacred)")
    parser.add_argument("--tensorboard", action="store_true", help="start TensorBoard over model_path, print its URL")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(main.py's arguments, the wrapper's, the argv the training process gets)."""
    full = argparse.ArgumentParser(
        description="neomesh: a main.py run recorded by sacred, restarted when its heartbeat stops",
        parents=[neomesh_main.build_parser(add_help=False), experiment_parser(add_help=False)], allow_abbrev=False)
    everything = full.parse_args(argv)
    own, passed = experiment_parser().parse_known_args(argv)
    for flag in WRAPPER_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in passed):
            full.error(f"{flag} is set by run_experiment.py (the sacred run id names the predictions)")
    # --new is done here, before sacred writes into model_path: the training process must not redo it
    passed = [a for a in passed if a not in ("--new", "--yes")]
    for name in ("initial_heartbeat_timeout", "heartbeat_timeout", "stop_grace"):
        value = getattr(own, name)
        if not (math.isfinite(value) and value > 0):
            full.error(f"--{name} {value}: must be a positive number of seconds")
    if own.max_restarts < 0:
        full.error(f"--max_restarts {own.max_restarts}: must be 0 or more")
    return everything, own, passed


# --- sacred ---------------------------------------------------------------------------------------


class SacredSink:
    """A metric sink (train.Sink) logging each row to a sacred run: every finite number, under its
    name, at its step. A step already logged for a name is not logged again: a restarted run trains
    the steps since its last checkpoint again and, resuming exactly, produces the same values."""

    def __init__(self, run):
        self.run = run
        self.last_step: dict[str, int] = {}

    def __call__(self, step: int, values: dict) -> None:
        for name, value in values.items():
            # null (a non-finite figure in metrics.jsonl's format) and counters of other types stay out
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if step <= self.last_step.get(name, -1):
                continue
            self.run.log_scalar(name, value, step)
            self.last_step[name] = step


def mongo_observer(url: str):
    """A MongoObserver on `url` (its database: the URL's path, else sacred), refused in one line when
    the server does not answer within 10 s."""
    import pymongo
    from pymongo import uri_parser

    MongoObserver = import_sacred().observers.MongoObserver

    try:
        database = uri_parser.parse_uri(url).get("database") or "sacred"
    except pymongo.errors.InvalidURI as err:
        raise ConfigError(f"--mongo {url!r}: not a MongoDB URL ({err}); e.g. mongodb://host:27017/neomesh") from None
    timeout = {"serverSelectionTimeoutMS": 10_000}
    try:
        pymongo.MongoClient(url, **timeout).admin.command("ping")
    except pymongo.errors.PyMongoError as err:
        raise ConfigError(f"--mongo {url}: no MongoDB server answers ({storage.first_line(err)}); start one, "
                          "or leave --mongo (and NEOMESH_MONGO) out to record the run in files only") from None
    return MongoObserver(url=url, db_name=database, **timeout)


def import_sacred():
    import warnings

    with warnings.catch_warnings():  # sacred 0.8.7 imports pkg_resources, which warns of its own removal
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        import sacred
        import sacred.observers
    return sacred


def build_experiment(name: str, config, sacred_dir: str, mongo_url: str | None):
    sacred = import_sacred()
    from sacred.observers import FileStorageObserver
    from sacred.utils import apply_backspaces_and_linefeeds

    Experiment = sacred.Experiment

    experiment = Experiment(name, base_dir=str(REPO_DIR), interactive=True)
    experiment.add_config(config.to_dict())
    experiment.observers.append(FileStorageObserver(sacred_dir))
    if mongo_url:
        experiment.observers.append(mongo_observer(mongo_url))
    experiment.captured_out_filter = apply_backspaces_and_linefeeds  # progress bars
    quiet = logging.getLogger("neomesh.sacred")  # sacred's own start/fail lines: run_experiment prints its own
    quiet.setLevel(logging.CRITICAL)
    experiment.logger = quiet
    return experiment


def default_sacred_dir(model_path: str) -> str:
    if storage.is_remote(model_path):
        raise ConfigError(f"model_path {model_path} is not a local folder, where sacred's file observer writes; "
                          "give one with --sacred_dir DIR")
    return storage.join(model_path, "sacred")


def attach_artifacts(run, model_path: str, sacred_id: str) -> list[str]:
    """The loss curve, metrics.jsonl and this run's prediction files, as sacred artifacts."""
    names = ["loss_curve.png", "metrics.jsonl"]
    patterns = [storage.join(model_path, n) for n in names] + [storage.join(model_path, f"predictions_{sacred_id}_*.txt")]
    attached = []
    with tempfile.TemporaryDirectory() as staging:
        for pattern in patterns:
            for path in sorted(storage.glob(pattern)) if "*" in pattern else [pattern]:
                if not storage.exists(path):
                    continue
                local = path
                if storage.is_remote(path):  # sacred copies from a local file
                    local = os.path.join(staging, storage.name(path))
                    Path(local).write_bytes(storage.read_bytes(path))
                # named here: sacred's guess at a content type prints a line for every artifact
                content_type = "image/png" if path.endswith(".png") else "text/plain"
                run.add_artifact(local, storage.name(path), content_type=content_type)
                attached.append(storage.name(path))
    return attached


# --- the training process and its heartbeat -------------------------------------------------------


class TrainingFailed(Exception):
    """The training process ended with an error, or kept falling silent. `reported`: its `error:`
    line was printed already (the training process's own)."""

    def __init__(self, message: str, returncode: int, reported: bool = False):
        super().__init__(message)
        self.returncode = returncode
        self.reported = reported


@dataclasses.dataclass
class Attempt:
    outcome: str  # "exited" | "silent" (no metric row in time) | "interrupted" (this process was signalled)
    returncode: int | None
    error_line: str


class StderrRelay(threading.Thread):
    """Copies the training process's stderr to ours as it comes, keeping its last `error:` line."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.error_line = ""

    def run(self) -> None:
        for line in self.stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("error: "):
                self.error_line = line[len("error: "):].strip()


def start_training(passed: list[str], sacred_id: str) -> tuple[subprocess.Popen, int, StderrRelay]:
    read_end, write_end = os.pipe()
    command = [sys.executable, str(MAIN_PY), *passed, "--sacred_id", sacred_id, "--metrics_fd", str(write_end)]
    try:
        child = subprocess.Popen(command, pass_fds=(write_end,), stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    finally:
        os.close(write_end)  # the child holds the only write end: its exit is the pipe's end of file
    relay = StderrRelay(child.stderr)
    relay.start()
    return child, read_end, relay


def watch(child: subprocess.Popen, read_end: int, sink, initial_timeout: float | None,
          timeout: float | None, interrupted: dict) -> tuple[str, float | None, bytes]:
    """Feed the child's metric rows to `sink` until it exits ("exited"), falls silent for longer than
    the heartbeat allows ("silent"), or this process is asked to stop ("interrupted"). Returns the
    outcome, the silence allowed when it fell silent, and the part of a row read so far."""
    deadline = time.monotonic() + initial_timeout if initial_timeout is not None else None
    allowed = initial_timeout
    pending = b""
    while True:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if interrupted["signal"] is not None:
            wait = 1.0 if wait is None else min(wait, 1.0)  # keep relaying until the child has saved
        ready, _, _ = select.select([read_end], [], [], wait)
        if not ready:
            if interrupted["signal"] is not None:
                if child.poll() is not None:
                    return "interrupted", None, pending
                continue
            return "silent", allowed, pending
        pending, rows = read_rows(read_end, pending, sink)
        if pending is None:
            child.wait()
            return ("interrupted" if interrupted["signal"] is not None else "exited"), None, b""
        if rows and deadline is not None:
            deadline, allowed = time.monotonic() + timeout, timeout


def read_rows(read_end: int, pending: bytes, sink) -> tuple[bytes | None, int]:
    """One read from the pipe: every complete row goes to `sink`. (what is left of a row, or None at
    the end of the pipe; the number of rows)."""
    data = os.read(read_end, 1 << 16)
    if not data:
        return None, 0
    *lines, pending = (pending + data).split(b"\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    for row in rows:
        sink(row.pop("step"), row)
    return pending, len(rows)


def drain(read_end: int, pending: bytes, sink) -> None:
    """The rows a stopped training process wrote before it exited (it saves and logs its last step)."""
    while pending is not None:
        pending, _ = read_rows(read_end, pending, sink)


def stop(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM (a process paused by SIGSTOP is continued, so that it can act on it: the training
    loop saves at its next step and exits), then SIGKILL if it has not exited within `grace`."""
    for signum in (signal.SIGTERM, signal.SIGCONT):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            return
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("training process %d did not exit within %g s of SIGTERM: SIGKILL", child.pid, grace)
        child.kill()
        child.wait()


def supervise(passed: list[str], sacred_id: str, sink, own, heartbeat: bool) -> dict:
    """Run main.py until it ends, restarting it from its last checkpoint whenever its heartbeat stops.
    Returns {"restarts": n}; raises TrainingFailed, or KeyboardInterrupt when this process was stopped."""
    interrupted = {"signal": None, "child": None}

    def forward(signum, _frame):  # preemption of this process: the child saves and exits, then we do
        interrupted["signal"] = signum
        if interrupted["child"] is not None and interrupted["child"].poll() is None:
            interrupted["child"].send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    restarts = 0
    try:
        while True:
            if interrupted["signal"] is not None:
                raise KeyboardInterrupt(f"signal {interrupted['signal']}")
            child, read_end, relay = start_training(passed, sacred_id)
            interrupted["child"] = child
            log.info("run_experiment: training process %d started (sacred run %s%s)", child.pid, sacred_id,
                     f", restart {restarts}" if restarts else "")
            try:
                outcome, limit, pending = watch(child, read_end, sink, own.initial_heartbeat_timeout if heartbeat else None,
                                       own.heartbeat_timeout if heartbeat else None, interrupted)
                if outcome == "silent":
                    stop(child, own.stop_grace)
                    drain(read_end, pending, sink)
            except KeyboardInterrupt:  # Ctrl-C reached the child too: it saves and exits
                child.wait()
                raise
            finally:
                os.close(read_end)
            if outcome == "silent":
                relay.join(5)
                if restarts >= own.max_restarts:
                    raise TrainingFailed(f"training process {child.pid} sent no metric row for {limit:g} s, and the "
                                         f"{own.max_restarts} restart(s) --max_restarts allows are spent; "
                                         "its checkpoints are in model_path", 1)
                restarts += 1
                log.warning("run_experiment: no new metric for %g s: stopped training process %d; restarting from "
                            "the last checkpoint (restart %d of %d)", limit, child.pid, restarts, own.max_restarts)
                continue
            relay.join(5)
            if outcome == "interrupted":
                raise KeyboardInterrupt(f"signal {interrupted['signal']}")
            if child.returncode != 0:
                raise TrainingFailed(relay.error_line or f"the training process exited with code {child.returncode}",
                                     child.returncode, reported=bool(relay.error_line))
            return {"restarts": restarts}
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- TensorBoard ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_tensorboard(model_path: str) -> subprocess.Popen | None:
    """TensorBoard over model_path on a free port, its URL printed; None (and how to install it) when
    the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        print(f"--tensorboard: the tensorboard package is not installed; install it with `pip install tensorboard`, "
              f"or watch this run from any machine that has it: tensorboard --logdir {model_path}", flush=True)
        return None
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", model_path, "--host", "localhost",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"TensorBoard: http://localhost:{port}/ (logdir {model_path})", flush=True)
    return server


# --- the command line -----------------------------------------------------------------------------


def start_afresh(model_path: str, assume_yes: bool) -> None:
    """--new: empty model_path (asking first) while holding its lock, before sacred records into it."""
    import train

    if not storage.exists(model_path):
        return
    lock = train.take_lock(model_path)
    try:
        train.confirm_new(model_path, assume_yes)
    finally:
        train.release_lock(lock)


def run(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 COMPLETED; the training process's code, or 2 for
    a mistake, when FAILED)."""
    args, own, passed = parse_args(sys.argv[1:] if argv is None else argv)
    from configs import load_config

    # neomesh's lines on stdout as main.py prints them (metrics.setup_logging would import JAX, which
    # this process never needs: the training process has the devices)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    try:
        neomesh = logging.getLogger("neomesh")
        level = neomesh.level
        neomesh.setLevel(logging.ERROR)  # the training process logs the config's notes itself
        try:
            config = load_config(args.model, neomesh_main.config_overrides(args))
        finally:
            neomesh.setLevel(level)
        if not config.model_path:
            raise ConfigError(f"{config.source}: key 'model_path' is empty; sacred records the run there "
                              "(e.g. --set model_path=runs/mymodel)")
        sacred_dir = own.sacred_dir or default_sacred_dir(config.model_path)
        if args.new:
            start_afresh(config.model_path, args.yes)
        experiment = build_experiment(own.experiment_name, config, sacred_dir, own.mongo)
    except USER_ERRORS as err:
        return report_user_error(err)

    @experiment.main
    def tracked(_run):
        sacred_id = str(_run._id)
        tensorboard = start_tensorboard(config.model_path) if own.tensorboard else None
        try:
            outcome = supervise(passed, sacred_id, SacredSink(_run), own, heartbeat=neomesh_main.trains(args))
        finally:
            if tensorboard is not None:
                tensorboard.terminate()
                try:
                    tensorboard.wait(10)
                except subprocess.TimeoutExpired:
                    tensorboard.kill()
            attach_artifacts(_run, config.model_path, sacred_id)
        return outcome

    try:
        finished = experiment.run()
    except TrainingFailed as err:
        if not err.reported:
            print(f"error: {err}", file=sys.stderr)
        log.info("run_experiment: sacred run FAILED, recorded in %s", sacred_dir)
        return err.returncode if err.returncode > 0 else USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        log.info("run_experiment: sacred run INTERRUPTED (%s)", sacred_dir)
        return 130
    log.info("run_experiment: sacred run %s COMPLETED, recorded in %s", finished._id, sacred_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run())
