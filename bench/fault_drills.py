"""kill -9 drills: a tiny model trained by main.py, killed at random moments, while an asynchronous
checkpoint is being written and right after one completes, resumed each time, and compared with an
uninterrupted run of the same config.

    python bench/fault_drills.py --drills 10            # about 30 s a drill on 2 CPU cores
    python bench/fault_drills.py --drills 2 --kills 1   # what `make test` runs (tests/test_drills.py)

A drill is exact when its metrics.jsonl (every row, timings aside) and its final parameters and
optimizer state equal the reference run's bit for bit. A corrupt checkpoint is one that a resume
found damaged (it warns and moves it to model_path/damaged_checkpoints). The last line printed is
one JSON object with the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MOMENTS = ("random", "during_save", "after_save")
TIMINGS = ("tokens_per_sec", "mfu")  # depend on the machine's speed, not on what was trained
MODEL = {
    "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_vocab": 256, "train_batch_size": 8,
    "attention_types": [[["global", "local"], 1]], "local_attention_radius": 8, "lr": 1e-3, "warmup_steps": 2,
    "lr_decay_end": 8, "datasets": [["drill", 2, "documents_random", 1.0]], "mesh_shape": "", "layout": "",
    "embed_dropout": 0.1, "res_dropout": 0.1, "iterations": 1, "eval_steps": 0, "keep_checkpoints": 2,
}


def prepare(folder: Path, train_steps: int, steps_per_checkpoint: int) -> Path:
    """Two shards of random documents, a dataset config and a model config; returns the model config."""
    import numpy as np

    from tfrecord import write_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(2, MODEL["n_vocab"], rng.integers(20, 90)) for _ in range(60)]
    (folder / "shards").mkdir(parents=True)
    write_shard(str(folder / "shards" / "drill_0_30.tfrecords"), docs[:30])
    write_shard(str(folder / "shards" / "drill_1_30.tfrecords"), docs[30:])
    (folder / "dataset_configs").mkdir()
    (folder / "dataset_configs" / "drill.json").write_text(json.dumps({
        "n_vocab": MODEL["n_vocab"], "path": str(folder / "shards" / "*.tfrecords"), "eos_id": 0, "padding_id": 1,
        "tokenizer_path": ""}))
    config = folder / "model.json"
    config.write_text(json.dumps({**MODEL, "train_steps": train_steps, "steps_per_checkpoint": steps_per_checkpoint}))
    return config


class Trainer:
    """main.py on one model_path, in a process of its own (killed with its whole process group)."""

    def __init__(self, config: Path, cache: Path):
        self.config = config
        inherited = [flag for flag in os.environ.get("XLA_FLAGS", "").split()  # the caller's, on one device
                     if not flag.startswith("--xla_force_host_platform_device_count")]
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": " ".join([*inherited, "--xla_force_host_platform_device_count=1"]),
                    # every process compiles the same step: the second one on reads it from disk
                    "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def start(self, model_path: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / "main.py"), "--model", str(self.config),
                                 "--set", f"model_path={model_path}"], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def finish(self, model_path: Path) -> str:
        process = self.start(model_path)
        output = process.communicate(timeout=900)[0]
        if process.returncode != 0:
            raise RuntimeError(f"main.py exited {process.returncode} on {model_path}:\n{output[-3000:]}")
        return output


def step_folders(model_path: Path) -> set[str]:
    folder = model_path / "checkpoints"
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def saving(model_path: Path) -> bool:
    folder = model_path / "checkpoints"
    return folder.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def wait_for(condition, process: subprocess.Popen, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


def kill_at(moment: str, process: subprocess.Popen, model_path: Path, rng: random.Random, seconds: float) -> bool:
    """Wait for the moment, then kill -9 the process group; False if the run ended first."""
    before = step_folders(model_path)
    metrics = model_path / "metrics.jsonl"
    started = lambda: metrics.exists() and metrics.stat().st_size > 0  # noqa: E731 - training has begun
    if not wait_for(started, process, seconds):
        return False
    if moment == "random":
        time.sleep(rng.uniform(0, 2.0))
    elif moment == "during_save":
        if not wait_for(lambda: saving(model_path), process, seconds):
            return False
    elif moment == "after_save":
        if not wait_for(lambda: step_folders(model_path) - before, process, seconds):
            return False
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def rows(model_path: Path) -> list[dict]:
    lines = (model_path / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines if line.strip()]


def final_state(config: Path, model_path: Path):
    """(step, params and optimizer state as numpy) of the newest checkpoint."""
    import jax

    import model_fns
    from checkpoints import Checkpoints, abstract_tree
    from configs import load_config
    from mesh import build_mesh_layout
    from optimizers import make_optimizer

    cfg = load_config(str(config), [f"model_path={model_path}"])
    layout = build_mesh_layout(cfg, jax.devices()[:1])
    optimizer = make_optimizer(cfg)
    shardings = model_fns.state_shardings(cfg, layout, optimizer)
    shapes = jax.eval_shape(lambda: model_fns.init_state(cfg, layout, optimizer, shardings))
    checkpoints = Checkpoints(str(model_path), read_only=True)
    try:
        step = checkpoints.latest_step()
        abstract = abstract_tree(shardings, shapes)
        state, _ = checkpoints.restore(step, {"params": abstract["params"], "opt_state": abstract["opt_state"]})
    finally:
        checkpoints.close()
    return step, jax.device_get(state)


def same_state(a, b) -> bool:
    import jax
    import numpy as np

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drills", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kill -9s per drill before it runs to the end")
    parser.add_argument("--train_steps", type=int, default=24)
    parser.add_argument("--steps_per_checkpoint", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="chooses the moments")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="neomesh-drills-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        config = prepare(workdir / "data", args.train_steps, args.steps_per_checkpoint)
        trainer = Trainer(config, workdir / "compilation-cache")
        reference_path = workdir / "reference"
        trainer.finish(reference_path)
        reference_rows, (reference_step, reference_state) = rows(reference_path), final_state(config, reference_path)

        counts = {"drills": 0, "kills": 0, "exact_resumes": 0, "corrupt_checkpoints": 0, "failed_resumes": 0}
        per_moment = {moment: 0 for moment in MOMENTS}
        for drill in range(args.drills):
            model_path = workdir / f"drill-{drill}"
            for _ in range(args.kills):
                moment = rng.choice(MOMENTS)
                if kill_at(moment, trainer.start(model_path), model_path, rng, seconds=300):
                    counts["kills"] += 1
                    per_moment[moment] += 1
            counts["drills"] += 1
            try:
                output = trainer.finish(model_path)
            except RuntimeError as err:
                counts["failed_resumes"] += 1
                print(f"drill {drill}: {err}", flush=True)
                continue
            damaged = model_path / "damaged_checkpoints"
            corrupt = len(list(damaged.iterdir())) if damaged.is_dir() else 0
            counts["corrupt_checkpoints"] += max(corrupt, output.count("is damaged or incomplete"))
            step, state = final_state(config, model_path)
            exact = rows(model_path) == reference_rows and step == reference_step and same_state(state, reference_state)
            counts["exact_resumes"] += exact
            print(f"drill {drill}: {'exact' if exact else 'DIFFERS'}; corrupt checkpoints {corrupt}", flush=True)
        report = {**counts, "kills_by_moment": per_moment, "train_steps": args.train_steps,
                  "steps_per_checkpoint": args.steps_per_checkpoint, "seconds": round(time.monotonic() - started, 1)}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    import machine

    report["machine"] = machine.describe()
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
