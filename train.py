"""The training loop: batch -> sharded step -> metrics -> checkpoint, importable without a command line.

    import train
    from configs import load_config
    result = train.run(load_config("demo", ["train_steps=100"]))
    result.step, result.metrics["loss"]

`run` resumes from the newest checkpoint in model_path (local or gs://) when there is one. It
refuses a checkpoint it cannot continue exactly: parameters or optimizer state of other shapes
(named, with the config keys that changed), and, unless `allow_data_change`, a changed seed,
train_batch_size, n_ctx or datasets mix, each of which would silently change the order of the
data. `main.py` is the command line around it; a notebook or the sacred wrapper call `run` directly
and may subscribe `sinks` to every metric row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

import storage
from configs import masked_labels
from errors import ConfigError, StorageError

log = logging.getLogger("neomesh")

# A metric sink receives (step, {name: value}) for every row the loop produces, on process 0.
Sink = Callable[[int, dict], None]

# keys that decide which rows make up each step's batch: resuming with another value trains on
# other data than an uninterrupted run would have, without any error
DATA_KEYS = ("seed", "train_batch_size", "n_ctx", "datasets")
# keys that change the optimizer state's tree (clipping on or off; another optimizer's moments)
OPTIMIZER_KEYS = ("opt_name", "gradient_clipping", "weight_decay")
# keys that differ between runs of one model without changing what a checkpoint holds
RUN_KEYS = ("train_steps", "model_path", "steps_per_checkpoint", "keep_checkpoints", "iterations", "eval_steps",
            "eval_batch_size", "predict_batch_size", "predict_max_steps")
# keys that may change on resume and shape no array of the state: never blamed for a shape that differs
MAY_CHANGE_ON_RESUME = RUN_KEYS + (
    "lr", "lr_decay", "lr_decay_end", "warmup_steps", "beta1", "beta2", "epsilon", "ada_epsilon1", "ada_epsilon2",
    "z_loss", "embed_dropout", "attn_dropout", "res_dropout", "recompute_grad", "tokens_per_mb_per_replica",
    "attention_kernel", "cpu_backward", "cpu_probe", "decode_precision", "decode_product", "mesh_shape", "layout", "log_grads", "skip_nonfinite_steps", "temperature",
    "top_k", "top_p", "repetition_penalty", "sampling_seed", "predict_steps", "eval_tasks", "lambada_path", "model")


@dataclasses.dataclass
class TrainResult:
    step: int  # the step the last checkpoint holds
    start_step: int  # where this run began (0, or the step it resumed from)
    metrics: dict  # the last metric row (loss, cross_entropy, lr, tokens_per_sec, mfu, ...), {} if none
    stopped_by_signal: bool = False


def run(config, new: bool = False, assume_yes: bool = False, allow_data_change: bool = False, layout=None,
        sinks: Sequence[Sink] = (), handle_signals: bool = True) -> TrainResult:
    """Train `config` (a validated configs.Config) to config.train_steps.

    new: delete model_path first (asks on a terminal unless assume_yes; refuses without one).
    allow_data_change: resume although seed / train_batch_size / n_ctx / datasets changed.
    layout: a mesh.MeshLayout; default: built from the config on all devices.
    sinks: callables given every metric row (step, values) on process 0, after metrics.jsonl and
    TensorBoard have it. handle_signals: SIGTERM / SIGINT save a checkpoint and return."""
    import jax

    from mesh import build_mesh_layout

    previous_handlers = take_stop_signals() if handle_signals else {}
    lock = None
    try:
        require_model_path(config)
        layout = layout if layout is not None else build_mesh_layout(config)
        main_process = jax.process_index() == 0
        lock = take_lock(config.model_path) if main_process else None  # multi-host: process 0 for all
        return train_loop(config, layout, new, assume_yes, allow_data_change, sinks)
    finally:
        if lock is not None:
            release_lock(lock)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        STOP["early"] = False


# --- preemption: a signal saves at the next step boundary, then the run returns -------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP = {"signal": None, "early": False}  # the signal received, if any; whether main.py caught it from its start


def on_stop_signal(signum, _frame) -> None:
    STOP["signal"] = signum


def catch_stop_signals() -> None:
    """For main.py, first thing when it is to train: a SIGTERM or SIGINT from here on is kept for
    the training loop (which then returns before its first step), instead of killing the process
    while it imports, restores and compiles."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    STOP["early"] = True


def take_stop_signals() -> dict:
    """Install the stop handlers for one run; returns the handlers they replace. A signal that
    main.py caught before the run counts; one left over from an earlier run in this process does not."""
    if not STOP["early"]:
        STOP["signal"] = None
    return {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}


def train_loop(config, layout, new, assume_yes, allow_data_change, sinks) -> TrainResult:

    """`run` once model_path is this process's: data -> sharded step -> metrics -> checkpoint."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import inputs
    import model_fns
    from checkpoints import CheckpointMeta, Checkpoints
    from metrics import RunLog, mesh_peak_flops, plot_loss_curve, progress_line
    from models import gpt2
    from optimizers import learning_rate, make_optimizer

    main_process = jax.process_index() == 0

    # --- where the run starts: afresh, or from the newest checkpoint ---------------------------
    if new:
        if main_process:
            confirm_new(config.model_path, assume_yes)
            take_lock(config.model_path)  # --new deleted it with everything else
        if jax.process_count() > 1:  # no host looks for checkpoints before process 0 has deleted them
            multihost_utils.sync_global_devices("neomesh --new")
    train_data = inputs.Sampler(config, "train")  # refuses ids >= n_vocab before anything is compiled
    eval_data = inputs.Sampler(config, "eval") if config.eval_steps > 0 and has_eval_data(config) else None

    from checkpoints import ADAPTERS_FOLDER, base_name, resolve_base
    from models import lora

    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    fine_tuning = lora.active(config)
    # fine-tuning saves the adapters alone into model_path/adapters, each naming the base they fit
    checkpoints = Checkpoints(config.model_path, config.keep_checkpoints,
                              folder=ADAPTERS_FOLDER if fine_tuning else "checkpoints")
    base = resolve_base(config) if fine_tuning else None
    meta_extra = {"base_checkpoint": base_name(base, config)} if fine_tuning else {}
    state, start = restore_or_init(config, layout, optimizer, shardings, checkpoints, allow_data_change, base)
    train_step = model_fns.make_train_step(config, layout, optimizer, shardings)
    eval_layout = layout.for_batch(config.eval_batch_size)  # an eval batch that does not divide runs unsplit
    eval_step = model_fns.make_eval_step(config, eval_layout, shardings, config.eval_batch_size) if eval_data else None
    task_eval = task_evaluator(config, layout)  # a missing task file is refused before any step

    run_log = RunLog(config.model_path, main_process, start)
    every_sink = [run_log.log, *sinks] if main_process else []

    def emit(step: int, values: dict) -> None:
        for sink in every_sink:
            sink(step, values)

    schedule = learning_rate(config)
    tokens_per_step = config.train_batch_size * config.n_ctx
    mesh_peak, peak_source = mesh_peak_flops(layout.mesh, config.precision, config.peak_flops)
    flops_per_step = model_fns.flops_per_token(config) * tokens_per_step
    log.info("training %s: %s parameters, %d devices (mesh %s, layout %s), steps %d..%d; MFU against %s",
             config.source, f"{gpt2.parameter_count(config):,}", layout.mesh.size, dict(layout.mesh.shape),
             layout.layout or "{}", start, config.train_steps, peak_source)

    def stopping(step: int, always: bool = False) -> bool:
        """Every host stops at the same step (saving is collective), if any host was signalled. Across
        hosts that takes an allgather, so they compare only every `iterations` steps (at each
        progress line) and at the last: a signal waits at most that many steps."""
        if jax.process_count() == 1:
            return STOP["signal"] is not None
        if not always and step % config.iterations and step != config.train_steps:
            return False
        flags = multihost_utils.process_allgather(np.asarray(STOP["signal"] is not None))
        return bool(np.any(flags))

    # --- the guard: no state that is not finite is ever saved -----------------------------------
    # Each step's finite flag is read once the next step is dispatched: the device keeps one step
    # queued, and the host learns of a bad step one step later, always before anything is saved.
    unchecked: list[tuple[int, dict]] = []
    skipped = {"steps": 0}

    def check_finite(keep_last: int = 0) -> None:
        while len(unchecked) > keep_last:
            bad_step, bad_metrics = unchecked.pop(0)
            if bool(bad_metrics["finite"]):
                continue
            if config.skip_nonfinite_steps:
                skipped["steps"] += 1
                log.warning("step %d is not finite (loss %s, gradient norm %s): skipped", bad_step,
                            float(bad_metrics["loss"]), float(bad_metrics["grad_norm"]))
                continue
            checkpoints.wait()
            newest = checkpoints.latest_step()
            kept = f"the newest checkpoint, step {newest}, is intact" if newest is not None else "no checkpoint was saved"
            raise FloatingPointError(
                f"step {bad_step} is not finite (loss {float(bad_metrics['loss'])}, gradient norm "
                f"{float(bad_metrics['grad_norm'])}); nothing from it was saved and {kept}: lower lr (or raise "
                "warmup_steps) and run again to resume from it, or set skip_nonfinite_steps")

    # --- the loop ---------------------------------------------------------------------------
    step, values, stopped = start, {}, False
    window_start, window_steps, window_sums = time.perf_counter(), 0, None
    try:
        if step < config.train_steps and stopping(step, always=True):  # signalled while starting: nothing new to save
            log.info("stopped by a signal before step %d; nothing new to save", step + 1)
            stopped = True
        while step < config.train_steps and not stopped:
            batch_inputs, batch_labels = inputs.global_batch(train_data, step, layout, config.train_batch_size)
            state, step_metrics = train_step(state, batch_inputs, batch_labels)
            unchecked.append((step + 1, step_metrics))
            check_finite(keep_last=1)
            # summed on the device: the host waits for nothing until the next progress line
            losses = {k: step_metrics[k] for k in ("loss", "cross_entropy")}
            window_sums = losses if window_sums is None else jax.tree.map(jax.numpy.add, window_sums, losses)
            step += 1
            window_steps += 1
            last = step == config.train_steps
            stopped = stopping(step)
            if step % config.iterations == 0 or last or stopped:
                check_finite()
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "finite"}
                # loss and cross_entropy: the mean over the steps since the last line, not one noisy batch
                values |= {k: float(v) / window_steps for k, v in jax.device_get(window_sums).items()}
                if config.skip_nonfinite_steps:
                    values["skipped_steps"] = skipped["steps"]
                seconds = (time.perf_counter() - window_start) / window_steps
                values |= {"lr": float(schedule(step - 1)), "tokens_per_sec": tokens_per_step / seconds,
                           "mfu": flops_per_step / seconds / mesh_peak}
                if main_process:
                    print(progress_line(step, config.train_steps, values, seconds), flush=True)
                emit(step, values)
                window_start, window_steps, window_sums = time.perf_counter(), 0, None
            if step % config.steps_per_checkpoint == 0 or last or stopped:
                check_finite()
                saving_started = time.perf_counter()
                checkpoints.save(step, state, CheckpointMeta.for_config(config, step, **meta_extra))
                if eval_step is not None and not stopped:
                    eval_loss = run_eval(config, layout, eval_step, model_fns.whole_params(state, config), eval_data)
                    if main_process:
                        print(f"step {step} | eval loss {eval_loss:.4f}", flush=True)
                    emit(step, {"eval_loss": eval_loss})
                    values = {**values, "eval_loss": eval_loss}
                if task_eval is not None and not stopped:
                    scores = task_eval(state["params"])
                    if main_process:
                        print(task_eval.line(step, scores), flush=True)
                    emit(step, scores)
                    values = {**values, **scores}
                # saving and evaluating are not training time; the loss window runs on to the next line
                window_start += time.perf_counter() - saving_started
            if stopped:
                log.info("stopped by a signal at step %d; checkpoint saved", step)
                break
    except BaseException as err:
        # the save in flight completes (or is recognisably incomplete and deleted) before the error
        # leaves: a corrupt shard or a full disk mid-run keeps the checkpoint that was being written
        for close in (checkpoints.close, run_log.close):
            try:
                close()
            except Exception as also:  # noqa: BLE001 - the first error is the one to report
                if not isinstance(err, StorageError) or str(also) != str(err):
                    log.warning("while stopping: %s", storage.first_line(also))
        raise
    else:
        checkpoints.close()  # a failed background save surfaces here at the latest
        run_log.close()
    if main_process:
        curve = plot_loss_curve(config.model_path)
        if curve:
            log.info("loss curve: %s", curve)
    return TrainResult(step=step, start_step=start, metrics=values, stopped_by_signal=stopped)


# --- one writer per model_path ----------------------------------------------------------------------

LOCK_FILE = "neomesh.lock"


def take_lock(model_path: str) -> str:
    """Make this process model_path's only writer: model_path/neomesh.lock names its host and pid.
    A lock whose owner is gone (its pid no longer runs on this host) is taken over with a warning;
    a live owner, or one on another host, is refused by name."""
    path = storage.join(model_path, LOCK_FILE)
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
    for _ in range(3):
        if storage.create_exclusive(path, mine):
            return path
        try:
            owner = json.loads(storage.read_text(path))
        except (FileNotFoundError, json.JSONDecodeError):
            owner = None  # released, or half-written by a writer that died: look again
        if owner is not None:
            if owner.get("host") != socket.gethostname():
                raise ConfigError(f"{path}: model_path is in use by process {owner.get('pid')} on host "
                                  f"{owner.get('host')}; use another model_path, or delete {path} if that run has ended")
            if process_is_running(owner.get("pid")):
                raise ConfigError(f"{path}: model_path is in use by process {owner.get('pid')} on this host; "
                                  "use another model_path, or stop that run first")
            log.warning("%s: taking over the lock of process %s, which is no longer running", path, owner.get("pid"))
        if storage.exists(path):
            storage.rm(path)
    raise ConfigError(f"{path}: could not take the lock on model_path (another writer keeps taking it)")


def process_is_running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def release_lock(path: str) -> None:
    """Delete the lock if it is still this process's. A store that fails now (a lost bucket) leaves
    it behind with a warning, not an error that would hide the run's own outcome (a later start on
    this host takes it over, its owner being gone)."""
    try:
        owner = json.loads(storage.read_text(path))
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            storage.rm(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return
    except Exception as err:  # noqa: BLE001 - OSError locally, gcsfs's errors on a bucket
        log.warning("%s: could not release the lock (%s); delete it if a later run on another host refuses it", path, storage.first_line(err))


# --- where a run starts ---------------------------------------------------------------------------


def require_model_path(config) -> None:
    if not config.model_path:
        raise ConfigError(f"{config.source}: key 'model_path' is empty; set the folder for checkpoints and metrics, "
                          "e.g. --set model_path=runs/mymodel")


def confirm_new(model_path: str, assume_yes: bool) -> None:
    """--new: delete model_path (a local folder, or every object under a gs:// prefix)."""
    if not set(storage.listdir(model_path)) - {LOCK_FILE}:  # nothing but this run's own lock
        return
    if not assume_yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"--new would delete {model_path}; pass --yes as well to confirm without a terminal")
        answer = input(f"--new: delete everything in {model_path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise SystemExit("kept model_path; nothing deleted")
    storage.rm_tree(model_path)
    log.info("--new: deleted %s", model_path)


def restore_or_init(config, layout, optimizer, shardings, checkpoints, allow_data_change: bool = False,
                    base=None):
    """(state, first step): the newest checkpoint if there is one, else a fresh initialisation.
    Fine-tuning (models/lora.py): the newest adapter checkpoint, refused unless it names `base`
    (checkpoints.resolve_base), and the frozen base restored from `base`: a checkpoint, or the
    config's random init when there is none."""
    import jax

    import model_fns
    from checkpoints import abstract_tree, base_name, check_base, restore_base
    from models import lora

    shapes = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    fine_tuning = lora.active(config)

    def check(step, meta):
        if fine_tuning:
            check_base(meta, base_name(base, config), checkpoints.where(step))
        check_resumable(config, meta, checkpoints.saved_shapes(step), shapes, checkpoints.where(step),
                        allow_data_change)

    found = checkpoints.restore_newest_intact(abstract_tree(shardings, shapes), check)
    frozen = None
    if fine_tuning:
        if base is None:
            log.warning("fine-tuning without a base: no checkpoint in model_path and no lora_base, so the adapters "
                        "train on the config's random init (seed %d)", config.seed)
        else:
            frozen = restore_base(config, layout, base)
            log.info("fine-tuning base: %s", base_name(base, config))
    if found is None:
        state = model_fns.init_state(config, layout, optimizer, shardings)
        if frozen is not None:
            state["base"] = frozen
        return state, 0
    state, _, step = found
    if fine_tuning:
        state["base"] = frozen if frozen is not None else model_fns.init_state(config, layout, optimizer,
                                                                               shardings)["base"]
    if state["opt_state"] is None:  # imported weights: a fresh optimizer from them
        log.info("checkpoint %d holds parameters only: starting a fresh optimizer state", step)
        state["opt_state"] = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(state["params"])
    state["step"] = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings["step"])
    log.info("resumed from %s at step %d", checkpoints.directory, step)
    return state, step


def changed_keys(config, saved_config: dict, keys=None) -> dict[str, tuple]:
    """{key: (checkpoint's value, config's value)} for the keys whose values differ."""
    current = json.loads(json.dumps(config.to_dict()))  # compared as the checkpoint stored them
    keys = keys if keys is not None else [k for k in current if k not in MAY_CHANGE_ON_RESUME]
    return {k: (saved_config.get(k), current.get(k)) for k in keys
            if k in saved_config and saved_config[k] != current.get(k)}


def describe(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: checkpoint {saved!r}, config {now!r}" for k, (saved, now) in changes.items())


def shape_differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    differ = [f"{name} {saved[name]} in the checkpoint, {expected[name]} now"
              for name in expected if name in saved and tuple(saved[name]) != tuple(expected[name])]
    differ += [f"{name} missing from the checkpoint" for name in expected if name not in saved]
    differ += [f"{name} only in the checkpoint" for name in saved if name not in expected]
    return differ


def check_resumable(config, meta, saved_shapes: dict, state_shapes: dict, where: str,
                    allow_data_change: bool = False) -> None:
    """Refuse, with a message that names what differs, a checkpoint that this config would not
    continue exactly (or not at all)."""
    from checkpoints import tree_names

    def listed(items, limit=8):
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    expected = {k: tuple(v.shape) for k, v in tree_names(state_shapes["params"]).items()}
    differ = shape_differences(saved_shapes["params"] or {}, expected)
    if differ:
        changes = changed_keys(config, meta.config)
        keys = f"; config keys changed: {describe(changes)}" if changes else ""
        raise ConfigError(f"{where} holds parameters of other shapes ({listed(differ)}){keys}. Use another "
                          "model_path, or --new to start afresh")

    if saved_shapes["opt_state"] is not None and not meta.params_only:
        expected = {k: tuple(v.shape) for k, v in tree_names(state_shapes["opt_state"]).items()}
        differ = shape_differences(saved_shapes["opt_state"], expected)
        if differ:
            changes = changed_keys(config, meta.config, OPTIMIZER_KEYS)
            why = describe(changes) if changes else listed(differ)
            raise ConfigError(f"{where} holds an optimizer state this config cannot continue ({why}). Restore those "
                              "keys, use another model_path, or --new to start afresh")

    changes = changed_keys(config, meta.config, DATA_KEYS)
    if changes and not meta.params_only:
        message = (f"{where}: resuming would change the order of the training data ({describe(changes)}); "
                   "restore the checkpoint's values, or pass --allow_data_change "
                   "(train.run(..., allow_data_change=True)) to resume with the new ones")
        if not allow_data_change:
            raise ConfigError(message)
        log.warning("--allow_data_change: %s", describe(changes))


# --- evaluation --------------------------------------------------------------------------------------


def has_eval_data(config) -> bool:
    from configs import resolve_datasets

    return any(dataset.eval_path for dataset in resolve_datasets(config))


def task_evaluator(config, layout):
    """eval_tasks.TaskEvaluator for the config's eval_tasks (read and tokenized now), or None."""
    if not config.eval_tasks:
        return None
    from eval_tasks import TaskEvaluator

    return TaskEvaluator(config, layout)


def run_eval(config, layout, eval_step, params, eval_data) -> float:
    """The evaluation loss while training: the mean cross-entropy (of an MLM model, over the masked
    positions of every batch)."""
    import inputs

    layout = layout.for_batch(config.eval_batch_size)
    if masked_labels(config):
        return masked_lm_totals(config, eval_data, eval_step, params, layout)[0]
    losses = []
    for i in range(max(config.eval_steps, 1)):
        batch_inputs, batch_labels = inputs.global_batch(eval_data, i, layout, config.eval_batch_size)
        losses.append(float(eval_step(params, batch_inputs, batch_labels)[1]))
    return sum(losses) / len(losses)


def evaluate(config, layout) -> dict:
    """--eval: cross-entropy, perplexity and bits per byte of the newest checkpoint on eval_path
    (the train split when there is none), and the scores of eval_tasks; printed on process 0, and
    returned."""
    import math

    import jax

    import encoders
    import inputs
    import model_fns
    from checkpoints import restore_params

    params, step = restore_params(config, layout)
    task_eval = task_evaluator(config, layout)
    tasks = task_eval(params) if task_eval is not None else {}
    if tasks and jax.process_index() == 0:
        print(task_eval.line(step, tasks))
    layout = layout.for_batch(config.eval_batch_size)  # an eval batch that does not divide runs unsplit
    split = "eval" if has_eval_data(config) else "train"
    data = inputs.Sampler(config, split)
    eval_step = model_fns.make_eval_step(config, layout, {"params": model_fns.param_shardings(config, layout)},
                                         config.eval_batch_size)
    if masked_labels(config):
        return evaluate_masked_lm(config, data, split, eval_step, params, step, layout)
    tokenizer = encoders.load_dataset_tokenizer(config)
    losses, byte_count, token_count = [], 0, 0
    for i in range(max(config.eval_steps, 1)):
        batch_inputs, batch_labels = inputs.global_batch(data, i, layout, config.eval_batch_size)
        losses.append(float(eval_step(params, batch_inputs, batch_labels)[1]))
        # batches are a pure function of the step: this host can rebuild every row to count its bytes
        labels = data.rows(i, range(config.eval_batch_size), config.eval_batch_size)[:, 1:]
        byte_count += sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in labels)
        token_count += labels.size
    loss = sum(losses) / len(losses)
    bits_per_byte = loss * token_count / max(byte_count, 1) / math.log(2)
    if jax.process_index() == 0:
        print(f"step {step} | {split} loss {loss:.4f} | perplexity {math.exp(loss):.2f} | bits per byte {bits_per_byte:.4f}")
    return {"step": step, "split": split, "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte,
            **tasks}


def evaluate_masked_lm(config, data, split: str, eval_step, params, step: int, layout) -> dict:
    """--eval of an MLM model: cross-entropy and accuracy of the original token at the masked
    positions, over every masked position of eval_steps batches (masked as training masks them);
    of a model trained on conversations, the same over the assistant's tokens (the targets)."""
    import jax

    loss, accuracy, masked = masked_lm_totals(config, data, eval_step, params, layout)
    scored = "masked" if config.mlm_training else "target"
    if jax.process_index() == 0:
        print(f"step {step} | {split} {scored}-token loss {loss:.4f} | {scored}-token accuracy {accuracy:.4f} | "
              f"{masked} {scored} tokens")
    return {"step": step, "split": split, "loss": loss, "accuracy": accuracy, "masked_tokens": masked}


def masked_lm_totals(config, data, eval_step, params, layout) -> tuple[float, float, int]:
    """(cross-entropy, accuracy, count) over every masked position of eval_steps batches: each
    batch's means weighted by its count of masked positions."""
    import inputs

    loss_sum, correct_sum, count = 0.0, 0.0, 0
    for i in range(max(config.eval_steps, 1)):
        batch_inputs, batch_labels = inputs.global_batch(data, i, layout, config.eval_batch_size)
        _, ce, accuracy, masked = (float(x) for x in eval_step(params, batch_inputs, batch_labels))
        loss_sum, correct_sum, count = loss_sum + ce * masked, correct_sum + accuracy * masked, count + int(masked)
    return loss_sum / max(count, 1), correct_sum / max(count, 1), count


def optimizer_state_report(config, state_shapes) -> dict:
    """Print and return what trains and what its optimizer state holds; when fine-tuning, beside
    what training the whole model would hold (from shapes alone: nothing is allocated)."""
    import math

    import jax

    from models import gpt2, lora
    from optimizers import make_optimizer

    def total_bytes(tree):
        return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    trained = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state_shapes["params"]))
    optimizer_bytes = total_bytes(state_shapes["opt_state"])
    report = {"trained_parameters": trained, "optimizer_state_bytes": optimizer_bytes}
    line = f"trained parameters: {trained:,}; optimizer state: {optimizer_bytes / 2**20:.2f} MiB"
    if lora.active(config):
        whole = config.replace(lora_rank=0, prompt_tuning_tokens=0, prefix_tuning=False, prefix_mlp_width=0,
                               lora_base="")
        full_bytes = total_bytes(jax.eval_shape(make_optimizer(whole).init, gpt2.param_shapes(whole)))
        report["full_training_optimizer_state_bytes"] = full_bytes
        line += (f" (fine-tuning adapters only; training every weight: {full_bytes / 2**20:.2f} MiB, "
                 f"{full_bytes / max(optimizer_bytes, 1):.0f}x as much); the frozen base is not trained")
    print(line)
    return report


def dry_run(config, layout, device_memory: int | None = None, stand_in: bool = False) -> dict:
    """Validate, check that every dataset's shards exist, compile the train step for the real shapes,
    and report what one device holds and sends (`compile_report`); refuse a step that does not fit
    `device_memory` (bytes; default: the detected device's). stand_in: the devices compiled for are not
    this machine's (simulated CPU devices, a --topology), so only `device_memory` says what fits."""
    import inputs

    for line in inputs.check_shards_exist(config):  # before the compile: a missing dataset fails fast
        print(line)
    return compile_report(config, layout, device_memory, stand_in)


def abstract_state(config, layout):
    """(optimizer, state shardings, state shapes) of a fresh training state on `layout`, from
    shapes alone: nothing is allocated."""
    import jax

    import model_fns
    from optimizers import make_optimizer

    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    return optimizer, shardings, jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))


def compile_train_step(config, layout):
    """The train step compiled ahead of time from shapes alone (nothing allocated): (compiled,
    (state shapes, state shardings), seconds the lowering and compile took)."""
    import jax

    import model_fns

    optimizer, shardings, state_shapes = abstract_state(config, layout)
    batch = jax.ShapeDtypeStruct((config.train_batch_size, config.n_ctx), jax.numpy.int32)
    start = time.perf_counter()
    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    compiled = step.lower(state_shapes, batch, batch).compile()
    return compiled, (state_shapes, shardings), time.perf_counter() - start


def compile_report(config, layout, device_memory: int | None = None, stand_in: bool = False) -> dict:
    """Compile the train step (and the eval step) from shapes alone and print one table: parameters
    (dense / expert), per-device bytes of parameters, optimizer state and temporaries, the
    collectives per step by kind and mesh axis, and whether it fits `device_memory`. On XLA:CPU,
    beside the compiled figure, an estimate for a bf16, rematerialising accelerator. Returns the
    figures as a dict; a ConfigError when the step does not fit."""
    import jax

    import model_fns
    import step_report
    from mesh import compiled_total_bytes, device_memory_bytes, refuse_beyond
    from models import gpt2

    compiled, (state_shapes, shardings), seconds = compile_train_step(config, layout)
    count = gpt2.parameter_count(config)
    experts = gpt2.parameter_count(config, experts=True)
    microbatches = model_fns.microbatch_count(config, layout)
    mesh_shape = dict(layout.mesh.shape)
    print(f"parameters: {count:,} ({count / 1e6:.1f}M)")
    if config.moe_layers:
        active = gpt2.parameter_count(config, matmul_only=True)
        print(f"  dense {count - experts:,}, experts {experts:,} ({len(config.moe_layers)} MoE layers x "
              f"{config.moe.num_experts} experts); a token's matmuls meet {active:,} (MFU counts these)")
    fsdp = f" fsdp_axes: {','.join(layout.fsdp_axes)}" if layout.fsdp_axes else ""
    print(f"mesh: {mesh_shape} layout: {layout.layout or '{}'}{fsdp}; microbatches per step: {microbatches}")
    report = {"parameters": count, "compile_seconds": seconds, "expert_parameters": experts,
              "dense_parameters": count - experts,
              "mesh_shape": mesh_shape, "layout": dict(layout.layout),
              "fsdp_axes": list(layout.fsdp_axes)} | optimizer_state_report(config, state_shapes)
    per_device = {part: step_report.sharded_bytes(state_shapes[part], shardings[part])
                  for part in ("params", "opt_state")}
    report["per_device_parameter_bytes"] = per_device["params"]
    report["per_device_optimizer_state_bytes"] = per_device["opt_state"]
    memory = compiled.memory_analysis()
    gib = 2**30
    platform = layout.mesh.devices.flat[0].platform
    rows = [("parameters", per_device["params"]), ("optimizer state", per_device["opt_state"])]
    if memory is not None:
        total = compiled_total_bytes(memory)
        report |= {"per_device_bytes": total, "per_device_temporary_bytes": memory.temp_size_in_bytes}
        rows += [("activations + temporaries", memory.temp_size_in_bytes),
                 ("compiled total (arguments + outputs + temporaries - donated)", total)]
    report["on_cpu"] = platform == "cpu"
    if report["on_cpu"]:
        estimate = step_report.accelerator_estimate(config, layout, microbatches, per_device,
                                                   report.get("per_device_temporary_bytes"))
        report["accelerator_estimate"] = estimate
        rows += [("accelerator estimate: gradients", estimate["gradients"]),
                 ("accelerator estimate: activations", estimate["activations"]),
                 ("accelerator estimate: total", estimate["total"])]
    print("per-device memory:")
    for what, size in rows:
        print(f"  {what:<62} {size / gib:9.3f} GiB ({size:,} B)")
    if report["on_cpu"]:
        print("  (XLA:CPU compiled this step: it does not rematerialise recompute_grad's blocks nor keep bf16 dots in "
              "bf16, so its temporaries overstate an accelerator's; the estimate is README.md's formula)")
    found = step_report.collectives(compiled.as_text(), mesh_shape)
    report["collectives"] = {f"{kind} over {axes}": figures for (kind, axes), figures in sorted(found.items())}
    print("collectives per step (kind over mesh axes: ops, bytes on one device):" if found else
          "collectives per step: none")
    for what, figures in report["collectives"].items():
        print(f"  {what:<40} {figures['count']:6d} ops {figures['bytes'] / gib:9.3f} GiB ({figures['bytes']:,} B)")
    needed = report["accelerator_estimate"]["total"] if report["on_cpu"] else report.get("per_device_bytes")
    if device_memory is None and not stand_in and needed is not None:
        device_memory, what = device_memory_bytes(layout.mesh.devices.flat)
        needed = report.get("per_device_bytes")  # this machine runs it: the compiled figure is the one
    else:
        what = "--device_memory"
    if device_memory is not None and needed is not None:
        fits = needed <= device_memory
        report |= {"device_memory": device_memory, "fits": fits}
        print(f"{'fits' if fits else 'does NOT fit'}: {needed / gib:.2f} GiB per device "
              f"{'within' if fits else 'beyond'} {what} ({device_memory / gib:.2f} GiB)")
        refuse_beyond(needed, device_memory, what, config.source)
    elif stand_in:
        print("fits: not checked (simulated devices; name one with --device_memory, e.g. 16GiB for a v3 core)")
    print(f"train step compiled in {seconds:.1f} s")
    if config.eval_steps > 0 and has_eval_data(config):
        # what training will run at every checkpoint: a batch that would fail there fails here instead
        start = time.perf_counter()
        eval_layout = layout.for_batch(config.eval_batch_size)
        eval_batch = jax.ShapeDtypeStruct((config.eval_batch_size, config.n_ctx), jax.numpy.int32)
        eval_step = model_fns.make_eval_step(config, eval_layout, shardings, config.eval_batch_size)
        eval_step.lower(gpt2.param_shapes(config), eval_batch, eval_batch).compile()  # the whole model's, as fine-tuning evaluates
        report["eval_compile_seconds"] = time.perf_counter() - start
        print(f"eval step (eval_batch_size {config.eval_batch_size}"
              f"{'' if eval_layout is layout else ', unsplit: it does not divide the batch axis'}) compiled in "
              f"{report['eval_compile_seconds']:.1f} s")
    return report
