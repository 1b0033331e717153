"""neomesh's command line: train, evaluate, sample, export, check a dataset, choose a layout.

    python main.py --model gpt3_small                      # train (all local devices)
    python main.py --model gpt3_small --set train_steps=100 --set mesh_shape=x:8
    python main.py --model gpt3_small --predict --prompt p.txt
    python main.py --model gpt3_small --eval
    python main.py --model gpt3_xl --tpu my-tpu            # TPU VM or pod slice, every host
    python main.py --model gpt3_small --gpu_ids 0 1 2      # these GPUs only

The training loop reads top to bottom in `train`: data -> sharded step -> metrics -> checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time

log = logging.getLogger("neomesh")

# glibc hands every large freed buffer back to the kernel, so XLA's per-step temporaries (GBs on
# a CPU) return as fresh pages that are faulted in and zeroed on first touch: ~1.1M page faults,
# a third of a 125M model's CPU train step. One arena that keeps what it frees lets each step
# reuse the last step's pages. The process holds its peak memory, as a training run does anyway.
REUSE_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"


def reuse_freed_memory() -> None:
    """Restart this process once with glibc keeping freed memory (unless the environment
    already sets glibc's malloc tunables, or JAX will run on an accelerator). Must run before
    anything large is allocated."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "glibc.malloc." in tunables or runs_on_accelerator():
        return
    environment = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, REUSE_FREED_MEMORY])))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def runs_on_accelerator() -> bool:
    """Whether JAX will pick a GPU or TPU, known without starting it: JAX_PLATFORMS, else an
    installed accelerator plugin. There the step's temporaries live in device memory, and the
    one malloc arena would serialise the compiler's threads (a GPU's compile took 4x longer)."""
    import importlib.util
    import pkgutil

    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return True
    plugins = importlib.util.find_spec("jax_plugins")
    return plugins is not None and any(pkgutil.iter_modules(plugins.submodule_search_locations))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="neomesh: GPT-3-style models on a named device mesh")
    parser.add_argument("--model", required=True, help="configs/NAME.json, or a path ending in .json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train_steps=100")
    parser.add_argument("--steps_per_checkpoint", type=int, help="steps between checkpoints (overrides the key)")
    parser.add_argument("--new", action="store_true", help="delete model_path and start afresh (asks first)")
    parser.add_argument("--yes", action="store_true", help="answer yes to --new's question")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate, compile the train step, print parameter count and per-device memory, exit")
    parser.add_argument("--eval", action="store_true", help="evaluate the newest checkpoint on eval_path")
    parser.add_argument("--predict", action="store_true", help="sample from the newest checkpoint")
    parser.add_argument("--prompt", help="text file holding the prompt for --predict")
    parser.add_argument("--sacred_id", default="nosacred", help="names the predictions file")
    parser.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                        help="write the newest checkpoint as a Hugging Face GPTNeo folder (default <model_path>/hf)")
    parser.add_argument("--check_dataset", action="store_true", help="print decoded samples and the token id range")
    parser.add_argument("--auto_layout", action="store_true", help="print a layout for mesh_shape, then exit")
    parser.add_argument("--auto_layout_and_mesh_shape", action="store_true",
                        help="print a mesh_shape and layout for the devices here, then exit")
    parser.add_argument("--tpu", help="TPU name: run on the TPU VM / pod slice (every host runs this command)")
    parser.add_argument("--gpu_ids", nargs="+", help="use only these GPUs, e.g. --gpu_ids 0 1 2")
    parser.add_argument("--coordinator_address", default=os.environ.get("NEOMESH_COORDINATOR"),
                        help="host:port of process 0, for multi-host GPU or CPU runs")
    parser.add_argument("--num_processes", type=int, default=int(os.environ.get("NEOMESH_NUM_PROCESSES", "1")))
    parser.add_argument("--process_id", type=int, default=int(os.environ.get("NEOMESH_PROCESS_ID", "0")))
    return parser.parse_args(argv)


def select_devices(args) -> None:
    """Choose devices and join the other hosts; must run before JAX touches a backend."""
    if args.gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(i.split(":")[-1] for i in args.gpu_ids)
    import jax

    if args.coordinator_address:
        # CPU processes need a collectives backend; accelerators ignore this setting
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.tpu and args.tpu != "colab":
        jax.distributed.initialize()  # a TPU pod slice finds its hosts by itself


def main(argv=None) -> int:
    args = parse_args(argv)
    from configs import load_config
    from errors import ConfigError, DataError
    from metrics import setup_logging

    setup_logging()

    try:
        overrides = list(args.set)
        if args.steps_per_checkpoint:
            overrides.append(f"steps_per_checkpoint={args.steps_per_checkpoint}")
        config = load_config(args.model, overrides)
        select_devices(args)
        return run(args, config)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args, config) -> int:
    import jax

    from mesh import auto_layout, build_mesh_layout

    if args.auto_layout or args.auto_layout_and_mesh_shape:
        device = jax.devices()[0]
        memory = (device.memory_stats() or {}).get("bytes_limit", 16e9)
        mesh_shape, layout = auto_layout(config, jax.device_count(), memory, args.auto_layout_and_mesh_shape)
        print(f'"mesh_shape": "{mesh_shape}",\n"layout": "{layout}"')
        return 0
    if args.check_dataset:
        import inputs

        print(inputs.check_dataset(config))
        return 0
    layout = build_mesh_layout(config)
    if args.predict:
        import sample

        print(f"predictions written to {sample.run_predict(config, layout, args.prompt, args.sacred_id)}")
        return 0
    if args.export is not None:
        import export

        if jax.process_count() > 1:
            from errors import ConfigError

            raise ConfigError("--export is a one-host job (it gathers every parameter onto one device): "
                              "run `python export.py --model M --to_hf DIR` on one machine")

        out_dir = args.export or os.path.join(config.model_path, "hf")
        print(f"Hugging Face model written to {export.export_to_hf(config, out_dir)}")
        return 0
    if args.eval:
        return evaluate(config, layout)
    if args.dry_run:
        return dry_run(config, layout)
    return train(config, layout, args)


# --- training ---------------------------------------------------------------------------------


def confirm_new(model_path: str, assume_yes: bool) -> None:
    if not os.path.exists(model_path):
        return
    if not assume_yes:
        if not sys.stdin.isatty():
            from errors import ConfigError

            raise ConfigError(f"--new would delete {model_path}; pass --yes as well to confirm without a terminal")
        answer = input(f"--new: delete everything in {model_path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise SystemExit("kept model_path; nothing deleted")
    shutil.rmtree(model_path)


def require_model_path(config) -> None:
    if not config.model_path:
        from errors import ConfigError

        raise ConfigError(f"{config.source}: key 'model_path' is empty; set the folder for checkpoints and metrics, "
                          "e.g. --set model_path=runs/mymodel")


# keys that change the shape of the parameters or of the optimizer state
SHAPE_KEYS = ("n_ctx", "n_embd", "n_head", "n_layer", "n_vocab", "attention_types", "intermediate_size",
              "opt_name", "gradient_clipping")


def check_same_model(config, saved: dict, where: str) -> None:
    """Resuming into a model of another shape would fail deep inside orbax; say what differs."""
    from errors import ConfigError

    saved_config = saved.get("config", {})
    def structure(key, value):  # clipping on or off changes the optimizer state; its threshold does not
        return value > 0 if key == "gradient_clipping" else value

    differ = [f"{k}: checkpoint {saved_config[k]!r}, config {getattr(config, k)!r}" for k in SHAPE_KEYS
              if k in saved_config and structure(k, saved_config[k]) != structure(k, getattr(config, k))]
    if differ:
        raise ConfigError(f"{where} holds a model of another shape ({'; '.join(differ)}); "
                          "use another model_path, or --new to start afresh")


def restore_or_init(config, layout, optimizer, shardings, checkpoints):
    """(state, first step): the newest checkpoint if there is one, else a fresh initialisation."""
    import jax

    import model_fns
    from checkpoints import abstract_tree

    step = checkpoints.latest_step()
    if step is None:
        return model_fns.init_state(config, layout, optimizer, shardings), 0
    check_same_model(config, checkpoints.meta(step), f"{checkpoints.directory}/{step}")
    shapes = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    state, _ = checkpoints.restore(step, abstract_tree(shardings, shapes))
    if state["opt_state"] is None:  # imported weights: a fresh optimizer from them
        log.info("checkpoint %d holds parameters only: starting a fresh optimizer state", step)
        state["opt_state"] = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(state["params"])
    state["step"] = jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings["step"])
    log.info("resumed from %s at step %d", checkpoints.directory, step)
    return state, step


def train(config, layout, args) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import inputs
    import model_fns
    from checkpoints import Checkpoints
    from metrics import RunLog, peak_flops_per_device, plot_loss_curve, progress_line
    from models import gpt2
    from optimizers import learning_rate, make_optimizer

    require_model_path(config)
    stop = {"signal": None}

    def on_signal(signum, _frame):  # preemption: save at the next step boundary, then leave
        stop["signal"] = signum

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    if args.new:
        if jax.process_index() == 0:
            confirm_new(config.model_path, args.yes)
        if jax.process_count() > 1:  # no host looks for checkpoints before process 0 has deleted them
            multihost_utils.sync_global_devices("neomesh --new")
    train_data = inputs.Sampler(config, "train")  # refuses ids >= n_vocab before anything is compiled
    eval_data = inputs.Sampler(config, "eval") if config.eval_steps > 0 and has_eval_data(config) else None

    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    checkpoints = Checkpoints(config.model_path, config.keep_checkpoints)
    state, start = restore_or_init(config, layout, optimizer, shardings, checkpoints)
    train_step = model_fns.make_train_step(config, layout, optimizer, shardings)
    eval_step = model_fns.make_eval_step(config, layout, shardings, config.eval_batch_size) if eval_data else None

    main_process = jax.process_index() == 0
    run_log = RunLog(config.model_path, main_process, start)
    schedule = learning_rate(config)
    tokens_per_step = config.train_batch_size * config.n_ctx
    peak, peak_source = peak_flops_per_device(config.precision)
    flops_per_step = model_fns.flops_per_token(config) * tokens_per_step
    log.info("training %s: %s parameters, %d devices (mesh %s, layout %s), steps %d..%d; MFU against %s",
             config.source, f"{gpt2.parameter_count(config):,}", layout.mesh.size, dict(layout.mesh.shape),
             layout.layout or "{}", start, config.train_steps, peak_source)

    def save(step):
        meta = {"step": step, "seed": config.seed, "data_position": step, "config": config.to_dict()}
        checkpoints.save(step, state, meta)

    def stopping() -> bool:
        """Every host stops at the same step (saving is collective), if any host was signalled."""
        if jax.process_count() == 1:
            return stop["signal"] is not None
        flags = multihost_utils.process_allgather(np.asarray(stop["signal"] is not None))
        return bool(np.any(flags))

    step = start
    window_start, window_steps, window_sums = time.perf_counter(), 0, None
    while step < config.train_steps:
        batch_inputs, batch_labels = inputs.global_batch(train_data, step, layout, config.train_batch_size)
        state, step_metrics = train_step(state, batch_inputs, batch_labels)
        # summed on the device: the host waits for nothing until the next progress line
        losses = {k: step_metrics[k] for k in ("loss", "cross_entropy")}
        window_sums = losses if window_sums is None else jax.tree.map(jax.numpy.add, window_sums, losses)
        step += 1
        window_steps += 1
        last = step == config.train_steps
        stopped = stopping()
        if step % config.iterations == 0 or last or stopped:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            # loss and cross_entropy: the mean over the steps since the last line, not one noisy batch
            values |= {k: float(v) / window_steps for k, v in jax.device_get(window_sums).items()}
            if not np.isfinite(values["loss"]):
                checkpoints.close()
                raise FloatingPointError(f"loss is {values['loss']} at step {step}; the checkpoints saved before "
                                         "it are kept (lower lr, or raise warmup_steps, and resume)")
            seconds = (time.perf_counter() - window_start) / window_steps
            values |= {"lr": float(schedule(step - 1)), "tokens_per_sec": tokens_per_step / seconds,
                       "mfu": flops_per_step / seconds / (peak * layout.mesh.size)}
            if main_process:
                print(progress_line(step, config.train_steps, values, seconds), flush=True)
            run_log.log(step, values)
            window_start, window_steps, window_sums = time.perf_counter(), 0, None
        if step % config.steps_per_checkpoint == 0 or last or stopped:
            save(step)
            if eval_step is not None and not stopped:
                eval_loss = run_eval(config, layout, eval_step, state["params"], eval_data)
                if main_process:
                    print(f"step {step} | eval loss {eval_loss:.4f}", flush=True)
                run_log.log(step, {"eval_loss": eval_loss})
            window_start, window_steps, window_sums = time.perf_counter(), 0, None  # saving is not training time
        if stopped:
            log.info("stopped by a signal at step %d; checkpoint saved", step)
            break
    checkpoints.close()
    run_log.close()
    if main_process:
        curve = plot_loss_curve(config.model_path)
        if curve:
            log.info("loss curve: %s", curve)
    return 0


def has_eval_data(config) -> bool:
    from configs import resolve_datasets

    return any(dataset.eval_path for dataset in resolve_datasets(config))


def run_eval(config, layout, eval_step, params, eval_data) -> float:
    import inputs

    losses = []
    for i in range(max(config.eval_steps, 1)):
        batch_inputs, batch_labels = inputs.global_batch(eval_data, i, layout, config.eval_batch_size)
        losses.append(float(eval_step(params, batch_inputs, batch_labels)[1]))
    return sum(losses) / len(losses)


def evaluate(config, layout) -> int:
    """--eval: cross-entropy, perplexity and bits per byte of the newest checkpoint on eval_path."""
    import math

    import jax

    import encoders
    import inputs
    import model_fns
    from checkpoints import restore_params

    params, step = restore_params(config, layout)
    split = "eval" if has_eval_data(config) else "train"
    data = inputs.Sampler(config, split)
    eval_step = model_fns.make_eval_step(config, layout, {"params": model_fns.param_shardings(config, layout)},
                                         config.eval_batch_size)
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
    return 0


def dry_run(config, layout) -> int:
    """Validate, compile the train step for the real shapes, and report its memory; train nothing."""
    import jax

    import model_fns
    from models import gpt2
    from optimizers import make_optimizer

    optimizer = make_optimizer(config)
    shardings = model_fns.state_shardings(config, layout, optimizer)
    state_shapes = jax.eval_shape(lambda: model_fns.init_state(config, layout, optimizer, shardings))
    batch = jax.ShapeDtypeStruct((config.train_batch_size, config.n_ctx), jax.numpy.int32)
    start = time.perf_counter()
    step = model_fns.make_train_step(config, layout, optimizer, shardings)
    compiled = step.lower(state_shapes, batch, batch).compile()
    seconds = time.perf_counter() - start
    count = gpt2.parameter_count(config)
    print(f"parameters: {count:,} ({count / 1e6:.1f}M)")
    print(f"mesh: {dict(layout.mesh.shape)} layout: {layout.layout or '{}'}; "
          f"microbatches per step: {model_fns.microbatch_count(config, layout)}")
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = 2**30
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes)
        print(f"per-device memory: {total / gib:.2f} GiB (arguments {memory.argument_size_in_bytes / gib:.2f}, "
              f"outputs {memory.output_size_in_bytes / gib:.2f}, temporaries {memory.temp_size_in_bytes / gib:.2f}, "
              f"donated {memory.alias_size_in_bytes / gib:.2f})")
    print(f"train step compiled in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    reuse_freed_memory()
    sys.exit(main())
