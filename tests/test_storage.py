"""Storage through fsspec: the whole path (tokenizer -> shards -> train -> resume -> predict ->
eval -> export -> --new) with model_path and the data on gs:// against a real local GCS emulator
(gcp-storage-emulator, in memory), and the parts a single process can hold on memory://."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from conftest import xla_flags
from test_train import REPO, SHARED_COMPILATION, TINY

import storage

BUCKET = "neomesh-test"
N_VOCAB = 320
# what storage.configure() derives from STORAGE_EMULATOR_HOST: a child process must derive it itself
DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """A GCS emulator on a free localhost port, holding one bucket in memory; STORAGE_EMULATOR_HOST
    names it for this process while the module's tests run."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                                "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("the GCS emulator did not start")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", url)
        storage.configure()
        yield url
    storage.configure()  # the variable is gone again: undo what configure() set
    process.terminate()
    process.wait(timeout=10)


def bucket_objects(prefix: str) -> list[str]:
    """Object names under gs://BUCKET/prefix, listed through gcsfs afresh."""
    fs, path = storage.filesystem(f"gs://{BUCKET}/{prefix}")
    fs.invalidate_cache()
    return [name[len(BUCKET) + 1:] for name in fs.find(path)]


def corpus(folder: Path) -> Path:
    """A few KB of real text: the repository's own Python sources."""
    folder.mkdir()
    for source in sorted(REPO.glob("*.py"))[:6]:
        (folder / f"{source.stem}.txt").write_text(source.read_text()[:6000])
    return folder


def prepare_data(workdir: Path, root: str) -> Path:
    """train_tokenizer and create_tfrecords writing under `root` (gs://... or memory://...), and a
    model config beside a dataset config naming them; returns the model config."""
    from data import create_tfrecords, train_tokenizer

    text = corpus(workdir / "corpus")
    tokenizer = train_tokenizer.main(["--base_dir", str(text), "--output_dir", f"{root}/tok", "--file_type", "txt",
                                      "--vocab_size", str(N_VOCAB)])
    assert tokenizer == f"{root}/tok/byte-level-bpe.tokenizer.json"
    shards = create_tfrecords.main(["--input_dir", str(text), "--name", "tiny", "--output_dir", f"{root}/shards",
                                    "--encoder_path", tokenizer, "--separator", "0", "--minimum_size", "1",
                                    "--chunk_size", str(TINY["n_ctx"]), "--files_per", "40", "--processes", "1",
                                    "--quiet"])
    assert len(shards) >= 2 and all(str(s).startswith(f"{root}/shards/tiny_") for s in shards)
    (workdir / "dataset_configs").mkdir()
    (workdir / "dataset_configs" / "tiny.json").write_text(json.dumps({
        "n_vocab": N_VOCAB, "path": f"{root}/shards/*.tfrecords", "eval_path": f"{root}/shards/tiny_1_*.tfrecords",
        "eos_id": 0, "padding_id": 1, "tokenizer_path": tokenizer}))
    config = {**TINY, "n_vocab": N_VOCAB, "datasets": [["tiny", 1, "chunks", 1.0]], "iterations": 1,
              "steps_per_checkpoint": 2, "mesh_shape": "", "layout": "", "eval_steps": 0, "eval_batch_size": 8,
              "predict_batch_size": 2, "predict_max_steps": 6}
    path = workdir / "model.json"
    path.write_text(json.dumps(config))
    return path


def main_py_with_emulator(emulator_url: str, *args: str) -> subprocess.CompletedProcess:
    """main.py in a new process that is given STORAGE_EMULATOR_HOST and nothing derived from it."""
    env = {k: v for k, v in os.environ.items() if k not in DERIVED}
    env |= {"STORAGE_EMULATOR_HOST": emulator_url, "XLA_FLAGS": xla_flags(1),
            "JAX_PLATFORMS": "cpu", **SHARED_COMPILATION}
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def in_process(*args: str, capsys) -> str:
    import main

    assert main.main(list(args)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_gs_model_path_trains_resumes_predicts_evaluates_exports_and_new_deletes(emulator, tmp_path, capsys):
    import train
    from configs import load_config
    from mesh import build_mesh_layout

    model_config = prepare_data(tmp_path, f"gs://{BUCKET}/data")
    assert {"data/tok/byte-level-bpe.tokenizer.json", "data/tok/dataset_config.json",
            "data/shards/.tiny.progress.npz"} <= set(bucket_objects("data"))
    model_path = f"gs://{BUCKET}/runs/tiny"
    run = ["--model", str(model_config), "--set", f"model_path={model_path}"]

    first = main_py_with_emulator(emulator, *run, "--set", "train_steps=2")
    assert "step 2/2 | loss" in first.stdout
    objects = set(bucket_objects("runs/tiny"))
    assert "runs/tiny/checkpoints/2/commit_success.txt" in objects
    assert any(o.startswith("runs/tiny/checkpoints/2/params/") for o in objects)
    assert any(o.startswith("runs/tiny/tensorboard/events.out.tfevents.") for o in objects)
    assert {"runs/tiny/metrics.jsonl", "runs/tiny/loss_curve.png"} <= objects
    assert not Path(REPO / "gs:").exists()

    second = main_py_with_emulator(emulator, *run, "--set", "train_steps=4", "--set", "keep_checkpoints=1")
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert "step 3/4" in second.stdout and "step 1/4" not in second.stdout
    # rotation on a bucket deletes object by object, the commit marker first: nothing of step 2 is left
    assert not any(o.startswith("runs/tiny/checkpoints/2/") for o in bucket_objects("runs/tiny/checkpoints"))
    assert "runs/tiny/checkpoints/4/commit_success.txt" in bucket_objects("runs/tiny/checkpoints")
    rows = [json.loads(line) for line in storage.read_text(f"{model_path}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert storage.read_bytes(f"{model_path}/loss_curve.png")[:4] == b"\x89PNG"

    storage.write_text(f"gs://{BUCKET}/prompt.txt", "def main(")
    out = in_process(*run, "--predict", "--prompt", f"gs://{BUCKET}/prompt.txt", "--sacred_id", "gs", capsys=capsys)
    predictions = f"{model_path}/predictions_gs_4.txt"
    assert f"predictions written to {predictions}" in out
    assert "SAMPLE 1" in storage.read_text(predictions) and "def main(" in storage.read_text(predictions)

    out = in_process(*run, "--eval", capsys=capsys)
    assert "step 4 | eval loss" in out or "step 4 | train loss" in out
    assert "bits per byte" in out

    in_process(*run, "--export", capsys=capsys)
    assert {"runs/tiny/hf/config.json", "runs/tiny/hf/model.safetensors", "runs/tiny/hf/tokenizer.json",
            "runs/tiny/hf/tokenizer_config.json"} <= set(bucket_objects("runs/tiny/hf"))
    assert json.loads(storage.read_text(f"{model_path}/hf/config.json"))["vocab_size"] == N_VOCAB

    # --new (main.py passes it on to train.run): every object under model_path goes, training starts at 0
    config = load_config(str(model_config), [f"model_path={model_path}", "train_steps=1"])
    result = train.run(config, new=True, assume_yes=True, layout=build_mesh_layout(config, jax.devices()[:1]))
    assert result.start_step == 0 and result.step == 1
    remaining = set(bucket_objects("runs/tiny"))
    assert not any(o.startswith(("runs/tiny/checkpoints/4/", "runs/tiny/hf/", "runs/tiny/predictions"))
                   for o in remaining), remaining
    assert "runs/tiny/checkpoints/1/commit_success.txt" in remaining


def test_memory_store_holds_tokenizer_shards_and_metrics_and_refuses_checkpoints(tmp_path):
    """memory:// lives in this process: data prepared there trains through train.run; metrics
    written there read back; a model_path there is refused by name (orbax cannot write it)."""
    import train
    from configs import load_config
    from errors import StorageError
    from mesh import build_mesh_layout
    from metrics import RunLog, plot_loss_curve, read_metrics

    root = f"memory://neomesh-{os.getpid()}-{tmp_path.name}"
    model_config = prepare_data(tmp_path, root)
    config = load_config(str(model_config), [f"model_path={tmp_path / 'run'}", "train_steps=2", "eval_steps=0"])
    rows = []
    result = train.run(config, layout=build_mesh_layout(config, jax.devices()[:1]),
                       sinks=[lambda step, values: rows.append((step, values["loss"]))])
    assert result.step == 2 and result.start_step == 0
    assert [step for step, _ in rows] == [1, 2] and result.metrics["loss"] == rows[-1][1]

    log = RunLog(f"{root}/run", enabled=True)
    log.log(1, {"loss": 5.0})
    log.log(2, {"loss": 4.0})
    log.close()
    assert read_metrics(f"{root}/run") == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    assert storage.glob(f"{root}/run/tensorboard/events.out.tfevents.*")
    assert storage.read_bytes(plot_loss_curve(f"{root}/run"))[:4] == b"\x89PNG"

    with pytest.raises(StorageError, match=f"model_path {root}/model: orbax checkpoints need"):
        train.run(config.replace(model_path=f"{root}/model"), layout=build_mesh_layout(config, jax.devices()[:1]))
