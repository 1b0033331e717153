"""What a run shows its user: the progress line, TensorBoard scalars, metrics.jsonl, the loss
curve, and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import datetime
import functools
import io
import json
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import storage
from errors import StorageError

# Dense peak FLOP/s per device of the compute dtype a run uses (vendor figures).
PEAK_FLOPS = {
    # device_kind substring: (float32, bfloat16)
    "H200": (494.7e12, 989.4e12),  # float32 through TF32 tensor cores
    "H100": (494.7e12, 989.4e12),
    "A100": (156e12, 312e12),
    "L4": (60e12, 121e12),
    "TPU v6": (918e12, 918e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (197e12, 197e12),
    "TPU v4": (275e12, 275e12),
    "TPU v3": (123e12, 123e12),
}


def matmul_roofline(size: int = 2048, repeats: int = 8, dtype=jnp.float32) -> float:
    """FLOP/s of a large jit-compiled matrix multiply on the default device: the best this
    machine does, against which MFU on a CPU is measured. Asked for as the model asks for its
    products (kernels.product): in `dtype`, accumulating in float32. (A bfloat16 product asked for
    in bfloat16 is one XLA:CPU converts to float32 first: 183 against 254 GFLOP/s on a Zen 4.)"""
    from models.kernels import product

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(product)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@functools.cache
def peak_flops_per_device(precision: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from)."""
    device = jax.devices()[0]
    for kind, (f32, bf16) in PEAK_FLOPS.items():
        if kind in device.device_kind:
            return (bf16 if precision == "bfloat16" else f32), f"{device.device_kind} datasheet"
    if device.platform == "cpu":
        # this host's simulated CPU devices share its cores: measure the host once and share it among
        # its own devices (each host of a multi-host run measures its own). 1024 is within a few
        # percent of 2048's rate (bench/ measures at 2048) at an eighth of the time, which every run
        # would otherwise spend before its first step
        return matmul_roofline(1024, repeats=4) / jax.local_device_count(), "measured matmul roofline"
    return float("nan"), f"unknown peak for {device.device_kind} (set peak_flops)"


def mesh_peak_flops(mesh, precision: str, configured: float) -> tuple[float, str]:
    """(peak FLOP/s of all the mesh's devices together, where the figure comes from). `configured`
    above 0 is one device's; else each host looks up or measures its own per-device peak, times
    its devices in the mesh, and the hosts' figures are summed once, as hosts may differ."""
    if configured > 0:
        return configured * mesh.size, "peak_flops from the config"
    per_device, source = peak_flops_per_device(precision)
    here = sum(device.process_index == jax.process_index() for device in mesh.devices.flat)
    if jax.process_count() == 1:
        return per_device * here, source
    from jax.experimental import multihost_utils

    hosts = [float(p) for p in multihost_utils.process_allgather(np.float32(per_device * here))]
    return math.fsum(hosts), f"{source} of each host, summed ({' + '.join(f'{p:.7g}' for p in hosts)} FLOP/s)"


def setup_logging() -> None:
    """neomesh's own INFO lines on stdout; libraries (orbax, jax, absl) keep to warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("neomesh").setLevel(logging.INFO)
    # orbax reports a failed background save (a full disk) through absl, with a traceback from each
    # of its threads, and asyncio adds one "Task exception was never retrieved" for each array
    # orbax left unawaited; checkpoints.py raises the failure as one StorageError naming the
    # checkpoint instead
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunLog:
    """metrics.jsonl and TensorBoard scalars in model_path (process 0 only): the training loop's
    first metric sink. model_path may be local, gs:// or memory:// (all through storage.py).

    Every write happens in the calling thread, so that a full disk or a lost bucket raises a
    StorageError naming the file at the row that met it (tensorboardX's SummaryWriter writes from a
    thread of its own, which dies with a traceback and loses the rows silently)."""

    def __init__(self, model_path: str, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = storage.join(model_path, "metrics.jsonl")
        self.remote = storage.is_remote(model_path)
        self.events = None
        self.rows: list[dict] = []
        if enabled:
            storage.makedirs(model_path)
            # a run that crashed after its last checkpoint logged steps that will be trained again
            self.rows = [r for r in read_metrics(model_path) if r["step"] <= start_step]
            storage.write_text(self.path, "".join(map(metrics_row, self.rows)))
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.record_writer import directory_check

            self.tensorboard = storage.join(model_path, "tensorboard")
            storage.tensorboard_writer_factory(self.tensorboard)
            try:
                directory_check(self.tensorboard)
                self.events = EventsWriter(storage.join(self.tensorboard, "events"))
            except StorageError:
                raise
            except Exception as err:  # noqa: BLE001 - OSError locally, gcsfs's errors on a bucket
                raise storage.write_error(self.tensorboard, err) from None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        self.rows.append(row)
        if self.remote:  # an object cannot be appended to: the file is uploaded whole (rows are small)
            storage.write_text(self.path, "".join(map(metrics_row, self.rows)))
        else:
            storage.append_line(self.path, metrics_row(row))
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        try:
            for name, value in values.items():
                self.events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(name, value)))
            self.events.flush()
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - see __init__
            raise storage.write_error(self.events._file_name, err) from None

    __call__ = log

    def close(self) -> None:
        if self.events is not None:
            events, self.events = self.events, None
            try:
                events.close()
            except StorageError:
                raise
            except Exception as err:  # noqa: BLE001 - see __init__
                raise storage.write_error(events._file_name, err) from None


class LineSink:
    """A metric sink writing each row as one line of metrics.jsonl's format to a stream (a pipe to
    the process that watches this run: run_experiment.py). A reader that has gone away ends
    nothing: the run's own records are metrics.jsonl and TensorBoard."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, step: int, values: dict) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(metrics_row({"step": step, **values}))
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # the reader closed its end
            self.stream = None


def progress_line(step: int, total: int, values: dict[str, float], seconds_per_step: float) -> str:
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}",
             f"{values['tokens_per_sec']:,.0f} tok/s"]
    if not math.isnan(values.get("mfu", math.nan)):
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts.append(f"ETA {format_eta((total - step) * seconds_per_step)}")
    return " | ".join(parts)


def metrics_row(row: dict) -> str:
    """One line of metrics.jsonl, strict JSON: a value that is not finite is written as null."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()},
                      allow_nan=False) + "\n"


def read_metrics(model_path: str) -> list[dict]:
    """The rows of metrics.jsonl. A last line cut short (a crash or a full disk mid-append) is
    dropped with a warning: it cannot hold a step a checkpoint depends on."""
    path = storage.join(model_path, "metrics.jsonl")
    if not storage.exists(path):
        return []
    lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise StorageError(f"{path}: line {number} is not JSON; fix or remove that line") from None
            logging.getLogger("neomesh").warning("%s: dropping its last line, cut short: %r", path, line[:80])
    return rows


def plot_loss_curve(model_path: str) -> str | None:
    """model_path/loss_curve.png from metrics.jsonl (training and evaluation loss)."""
    records = read_metrics(model_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()  # rendered here, written through storage: the same for a bucket
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    return storage.write_bytes(storage.join(model_path, "loss_curve.png"), image.getvalue())
