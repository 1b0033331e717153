"""neomesh's command line: train, evaluate, sample, export, check a dataset, choose a layout.

    python main.py --model gpt3_small                      # train (all local devices)
    python main.py --model gpt3_small --set train_steps=100 --set mesh_shape=x:8
    python main.py --model gpt3_small --predict --prompt p.txt
    python main.py --model gpt3_small --eval
    python main.py --model gpt3_xl --tpu my-tpu            # TPU VM or pod slice, every host
    python main.py --model gpt3_small --gpu_ids 0 1 2      # these GPUs only

The training loop lives in train.py (`train.run(config)`, also called by notebooks and the sacred
wrapper); this file parses the command line, chooses devices and dispatches.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

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


SIMULATED = {"devices": 0}  # how many CPU devices simulate_mesh_devices set up for this process


def simulate_mesh_devices(args) -> None:
    """--dry_run / --auto_layout* on a CPU machine: compile for the config's whole mesh with as many
    simulated CPU devices, set before JAX starts (--auto_layout_and_mesh_shape searches meshes of
    that many devices). Left alone when JAX will run on an accelerator,
    devices are chosen (--gpu_ids, --tpu, --topology), the user set a device count, or mesh_shape is
    empty (data parallel over the devices there are). A config that does not parse is left to
    load_config's error."""
    import math
    import re

    from configs import parse_override, read_json, resolve_model_path

    flags = os.environ.get("XLA_FLAGS", "")
    if not (args.dry_run or args.auto_layout or args.auto_layout_and_mesh_shape) or args.gpu_ids or args.tpu or args.topology or runs_on_accelerator() \
            or "xla_force_host_platform_device_count" in flags or "jax" in sys.modules:
        return
    try:
        values = read_json(resolve_model_path(args.model))
        for override in args.set:
            key, value = parse_override(override)
            values[key] = value
        sizes = re.findall(r":\s*([0-9]{1,6})\s*(?:,|$)", str(values.get("mesh_shape") or ""))
    except Exception:  # noqa: BLE001 - load_config reports it, naming its file
        return
    devices = math.prod(int(size) for size in sizes) if sizes else 0
    if devices > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        SIMULATED["devices"] = devices


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """main.py's arguments; run_experiment.py takes the same ones (and adds its own)."""
    parser = argparse.ArgumentParser(description="neomesh: GPT-3-style models on a named device mesh", add_help=add_help)
    parser.add_argument("--model", required=True, help="configs/NAME.json, or a path ending in .json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train_steps=100")
    parser.add_argument("--steps_per_checkpoint", type=int, help="steps between checkpoints (overrides the key)")
    parser.add_argument("--new", action="store_true", help="delete model_path and start afresh (asks first)")
    parser.add_argument("--yes", action="store_true", help="answer yes to --new's question")
    parser.add_argument("--allow_data_change", action="store_true",
                        help="resume although seed, train_batch_size, n_ctx or datasets changed since the checkpoint "
                             "(the data order then differs from an uninterrupted run's)")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate, check that the datasets' shards exist, compile the train and eval steps for the whole "
                             "mesh (on a CPU machine: as many simulated devices), print parameters, per-device memory, "
                             "collectives and, on XLA:CPU, an accelerator estimate (refused beyond a device's memory), exit")
    parser.add_argument("--device_memory", metavar="SIZE",
                        help="--dry_run: whether the step fits a device of this memory, e.g. 16GiB (a v3 core), 80GB "
                             "(default: the detected device's)")
    parser.add_argument("--topology", metavar="NAME",
                        help="--dry_run: compile for this TPU topology ahead of time with the TPU compiler (needs "
                             "libtpu), e.g. v3-256 or v4:4x4x4")
    parser.add_argument("--eval", action="store_true", help="evaluate the newest checkpoint on eval_path")
    parser.add_argument("--predict", action="store_true", help="sample from the newest checkpoint")
    parser.add_argument("--prompt", help="text file holding the prompt for --predict, or one Firefly-format "
                        "conversation (a JSON line whose last turn has no assistant text): continued as the assistant")
    parser.add_argument("--entmax_sampling", action="store_true",
                        help="--predict draws from entmax-1.3 of the logits instead of softmax, after repetition_penalty, "
                             "temperature, top_k and top_p (top_p measured in entmax probabilities); greedy is unchanged")
    parser.add_argument("--sacred_id", default="nosacred", help="names the predictions file")
    parser.add_argument("--export", nargs="?", const="", default=None, metavar="DIR",
                        help="write the newest checkpoint as a Hugging Face GPTNeo folder (default <model_path>/hf)")
    parser.add_argument("--check_dataset", action="store_true", help="print decoded samples and the token id range")
    parser.add_argument("--auto_layout", action="store_true",
                        help="search layouts (and fsdp_axes) for mesh_shape: compile the promising ones ahead of time, "
                             "rank those that fit --device_memory by estimated step time, print them and the --set "
                             "line of the best, then exit")
    parser.add_argument("--auto_layout_and_mesh_shape", action="store_true",
                        help="the same over every mesh of up to 4 axes of the devices here (on a CPU machine: as many "
                             "simulated devices as the config's mesh_shape has, e.g. --set mesh_shape=x:64)")
    parser.add_argument("--search_seconds", type=float, default=300,
                        help="--auto_layout*: start no compile after this many seconds (default 300)")
    parser.add_argument("--device_flops", type=float, metavar="FLOP/S",
                        help="--auto_layout*: one device's FLOP/s for the step-time model (default: the config's "
                             "peak_flops, else the detected device's peak; 1e14 for simulated devices)")
    parser.add_argument("--link_bandwidth", type=float, metavar="BYTES/S",
                        help="--auto_layout*: bytes per second one device sends in collectives (default 1e11)")
    parser.add_argument("--tpu", help="TPU name: run on the TPU VM / pod slice (every host runs this command)")
    parser.add_argument("--gpu_ids", nargs="+", help="use only these GPUs, e.g. --gpu_ids 0 1 2")
    parser.add_argument("--coordinator_address", default=os.environ.get("NEOMESH_COORDINATOR"),
                        help="host:port of process 0, for multi-host GPU or CPU runs")
    parser.add_argument("--num_processes", type=int, default=int(os.environ.get("NEOMESH_NUM_PROCESSES", "1")))
    parser.add_argument("--process_id", type=int, default=int(os.environ.get("NEOMESH_PROCESS_ID", "0")))
    parser.add_argument("--peer_timeout", type=float, default=float(os.environ.get("NEOMESH_PEER_TIMEOUT", "60")),
                        help="multi-host: seconds without a sign of life from another process after which every "
                             "process stops with a message (instead of waiting in a collective for ever)")
    parser.add_argument("--metrics_fd", type=int, metavar="FD",
                        help="also write every metric row as one JSON line to this inherited file descriptor "
                             "(run_experiment.py reads it for sacred and its heartbeat)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_overrides(args) -> list[str]:
    """The --set overrides, with the flags that stand for a config key (--steps_per_checkpoint)."""
    overrides = list(args.set)
    if args.steps_per_checkpoint:
        overrides.append(f"steps_per_checkpoint={args.steps_per_checkpoint}")
    return overrides


def gpu_index(text: str) -> int:
    """A --gpu_ids entry -> the GPU's index: "1", or GPT-Neo's "device:GPU:1" spelling."""
    from errors import ConfigError

    index = text.rsplit(":", 1)[-1].strip()
    if not index.isascii() or not index.isdigit():
        raise ConfigError(f"--gpu_ids: {text!r} is not a GPU index; expected integers, e.g. --gpu_ids 0 1 2")
    return int(index)


def select_devices(args) -> None:
    """Choose devices and join the other hosts; must run before JAX touches a backend. Devices the
    command line asks for that this machine does not have are one clear error, never a silent CPU run."""
    from errors import ConfigError

    if args.gpu_ids and args.tpu:
        raise ConfigError("--gpu_ids and --tpu both given: choose one")
    gpu_ids = [gpu_index(text) for text in args.gpu_ids or []]
    if len(set(gpu_ids)) != len(gpu_ids):
        raise ConfigError(f"--gpu_ids {' '.join(args.gpu_ids)}: a GPU is named twice")
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    pod_slice = args.tpu and args.tpu != "colab" and not args.coordinator_address
    if pod_slice and importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--tpu {args.tpu}: this machine has no TPU runtime (the libtpu package is not "
                          "installed); run the command on every host of the TPU VM or pod slice, or leave out --tpu")
    import jax

    if args.coordinator_address:
        # CPU processes need a collectives backend; accelerators ignore this setting
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif pod_slice:
        try:
            jax.distributed.initialize()  # a TPU pod slice finds its hosts by itself
        except (ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--tpu {args.tpu}: could not find the TPU slice's hosts ({reason}); run on a TPU VM "
                              "of the slice, or give --coordinator_address, --num_processes and --process_id") from None
    if jax.process_count() > 1:
        if not args.peer_timeout > 0:
            raise ConfigError(f"--peer_timeout {args.peer_timeout}: expected a positive number of seconds")
        PeerWatchdog(args.peer_timeout).start()
    if gpu_ids:
        gpus = accelerators("gpu")
        if not gpus:
            raise ConfigError(f"--gpu_ids {' '.join(args.gpu_ids)}: JAX finds no GPU with those indices on this machine "
                              f"(it would run on {jax.default_backend()}); leave out --gpu_ids to run there")
        if len(gpus) != len(gpu_ids):
            raise ConfigError(f"--gpu_ids {' '.join(args.gpu_ids)}: asks for {len(gpu_ids)} GPUs, JAX finds "
                              f"{len(gpus)} of them on this machine")
    if args.tpu and not accelerators("tpu"):
        where = "a Colab TPU runtime" if args.tpu == "colab" else "a TPU"
        raise ConfigError(f"--tpu {args.tpu}: JAX finds no TPU here (it would run on {jax.default_backend()}); run in "
                          f"{where}, or leave out --tpu")


def topology_devices(name: str) -> list:
    """--topology NAME: the devices of a TPU topology, for compiling ahead of time without the
    hardware (JAX's AOT topology API, which needs libtpu's compiler)."""
    from errors import ConfigError

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology {name}: compiling for a TPU topology needs the TPU compiler (the libtpu "
                          "package, e.g. pip install 'jax[tpu]'), which is not installed here; leave out --topology "
                          "to compile for simulated CPU devices")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as err:  # noqa: BLE001 - libtpu's errors name no type of their own
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--topology {name}: libtpu does not know this topology ({reason[:200]}); e.g. v3-256 "
                          "or v4:4x4x4") from None


def accelerators(platform: str) -> list:
    """This process's devices of `platform` ("gpu", "tpu"), [] where JAX has none (or may not use
    it: JAX_PLATFORMS), and only when that is also the backend JAX computes on."""
    import jax

    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError:  # no such backend, or it failed to start
        return []
    return devices if jax.default_backend() == platform else []


class PeerWatchdog:
    """Multi-host: stop this process, with a message, when another process of the run is gone.

    A process that dies mid-step leaves the others waiting in a collective that never completes
    (until the coordination service aborts them, a minute or more later, with SIGABRT). Each process
    posts a heartbeat to the coordinator's key-value store from a thread of its own; a peer whose
    heartbeat stops for `timeout` seconds, or a coordinator that no longer answers, ends this
    process with one line and exit code 3. A process that ends posts whether it finished or failed,
    so that the others do not wait out the timeout for it. Orbax commits a checkpoint only once it
    is complete, so a later start of every process resumes from the newest complete one."""

    PREFIX = "neomesh/peers/"
    EXIT_CODE = 3

    def __init__(self, timeout: float):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout = timeout
        self.interval = max(min(timeout / 5, 5.0), 0.2)
        self.beats = 0

    def start(self) -> None:
        import atexit
        import threading

        if self.client is None:
            return
        self.post("alive", 0)
        atexit.register(self.post_end)
        threading.Thread(target=self.watch, name="neomesh-peer-watchdog", daemon=True).start()

    def post(self, state: str, beat: int) -> None:
        self.client.key_value_set(f"{self.PREFIX}{self.me}", f"{state} {beat}", allow_overwrite=True)

    def post_end(self) -> None:
        try:
            self.post("failed" if ENDED["failed"] else "finished", self.beats)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already; nothing to tell
            pass

    def watch(self) -> None:
        import time

        last_seen = {peer: (None, time.monotonic()) for peer in range(self.count) if peer != self.me}
        while True:
            time.sleep(self.interval)
            self.beats += 1
            now = time.monotonic()
            try:
                self.post("alive", self.beats)
                for peer, (seen, since) in list(last_seen.items()):
                    value = self.peer_state(peer)
                    if value is None:  # not started yet: its time runs from ours
                        pass
                    elif value.startswith("finished"):
                        del last_seen[peer]
                    elif value.startswith("failed"):
                        self.stop(f"process {peer} of {self.count} failed (its own output says why)")
                    elif value != seen:
                        last_seen[peer] = (value, now)
                    elif now - since > self.timeout:
                        self.stop(f"process {peer} of {self.count} has given no sign of life for {now - since:.0f} s "
                                  "(--peer_timeout)")
            except Exception as err:  # noqa: BLE001 - the coordinator (process 0) is gone: any error says so
                if ENDED["ending"]:
                    return
                self.stop(f"the coordinator (process 0) no longer answers ({str(err).strip().splitlines()[0][:200]})")

    def peer_state(self, peer: int) -> str | None:
        try:
            return self.client.key_value_try_get(f"{self.PREFIX}{peer}")
        except Exception as err:  # noqa: BLE001 - jaxlib raises a plain error; NOT_FOUND: nothing posted yet
            if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
                return None
            raise

    def stop(self, why: str) -> None:
        if ENDED["ending"]:  # this process is ending on its own, with its own message
            return
        print(f"error: {why}; process {self.me} stops too. Start every process again to resume from the newest "
              "complete checkpoint in model_path", file=sys.stderr, flush=True)
        os._exit(self.EXIT_CODE)


ENDED = {"failed": False, "ending": False}  # how main() ended, for PeerWatchdog.post_end


def trains(args) -> bool:
    return not (args.predict or args.eval or args.export is not None or args.dry_run or args.check_dataset
                or args.auto_layout or args.auto_layout_and_mesh_shape)


# below this many training FLOPs per token (a model of ~15M matmul weights) a run's start-up
# outweighs what a faster kernel could save, and the probe is skipped
PROBE_MIN_FLOPS_PER_TOKEN = 1e8


def probes_machine(args, config) -> bool:
    """Whether this run picks XLA:CPU's options and neomesh's CPU kernels by timing them here
    (machine.py; the config's cpu_probe may still say off): when it trains or samples a model
    large enough to gain from it, on one host. Hosts of one job must compile the same program,
    and each would probe for itself."""
    from model_fns import flops_per_token

    multi_host = args.coordinator_address or args.num_processes > 1 or args.tpu
    return ((trains(args) or args.predict) and not multi_host and config.cpu_probe != "off"
            and flops_per_token(config) >= PROBE_MIN_FLOPS_PER_TOKEN)


def main(argv=None) -> int:
    args = parse_args(argv)
    ENDED.update(failed=False, ending=False)
    SIMULATED["devices"] = 0
    simulate_mesh_devices(args)  # before anything imports JAX
    import storage  # noqa: F401  (first: translates STORAGE_EMULATOR_HOST before any storage library starts)
    import train

    if trains(args) and argv is None:  # the command line itself, not a caller's in-process use
        train.catch_stop_signals()  # a preemption while JAX starts and compiles is kept, not fatal
    from configs import load_config
    from errors import USER_ERRORS, report_user_error
    from metrics import setup_logging

    setup_logging()

    try:
        config = load_config(args.model, config_overrides(args))
        probes = probes_machine(args, config)
        if probes:
            import machine

            machine.set_xla_dot_option(config, decoding=args.predict)  # XLA reads its flags when JAX starts
        if SIMULATED["devices"]:
            log.info("%d simulated CPU devices stand in for mesh_shape %s's devices (XLA:CPU compiles; "
                     "see the accelerator estimate)", SIMULATED["devices"], config.mesh_shape)
        select_devices(args)
        if probes:
            config = machine.tune(config, decoding=args.predict)
        code = run(args, config, metric_sinks(args))
        ENDED["failed"] = code != 0
        return code
    except USER_ERRORS as err:
        ENDED["failed"] = True
        return report_user_error(err)
    except BaseException:
        ENDED["failed"] = True
        raise
    finally:
        ENDED["ending"] = True


def metric_sinks(args) -> list:
    """--metrics_fd: a sink writing every metric row to that descriptor, on process 0."""
    if args.metrics_fd is None:
        return []
    from metrics import LineSink

    try:
        stream = os.fdopen(args.metrics_fd, "w", buffering=1)
    except OSError as err:
        from errors import ConfigError

        raise ConfigError(f"--metrics_fd {args.metrics_fd}: not an open file descriptor ({err.strerror})") from None
    return [LineSink(stream)]


def run(args, config, sinks=()) -> int:
    import jax

    import storage
    from mesh import build_mesh_layout

    if args.auto_layout or args.auto_layout_and_mesh_shape:
        search_layouts(args, config)
        return 0
    if args.check_dataset:
        import inputs

        print(inputs.check_dataset(config))
        return 0
    if args.topology and not args.dry_run:
        from errors import ConfigError

        raise ConfigError(f"--topology {args.topology}: only --dry_run compiles for a topology it does not run on")
    layout = build_mesh_layout(config, topology_devices(args.topology) if args.topology else None)
    if args.predict:
        import sample

        print(f"predictions written to {sample.run_predict(config, layout, args.prompt, args.sacred_id, args.entmax_sampling)}")
        return 0
    if args.export is not None:
        import export

        if jax.process_count() > 1:
            from errors import ConfigError

            raise ConfigError("--export is a one-host job (it gathers every parameter onto one device): "
                              "run `python export.py --model M --to_hf DIR` on one machine")

        out_dir = args.export or storage.join(config.model_path, "hf")
        print(f"Hugging Face model written to {export.export_to_hf(config, out_dir)}")
        return 0
    import train

    if args.eval:
        result = train.evaluate(config, layout)
        figures = {f"eval_{k}": v for k, v in result.items() if isinstance(v, float)}
        for sink in sinks if jax.process_index() == 0 else ():
            sink(result["step"], figures)
        return 0
    if args.dry_run:
        from step_report import parse_memory

        device_memory = parse_memory(args.device_memory) if args.device_memory is not None else None
        train.dry_run(config, layout, device_memory, stand_in=bool(SIMULATED["devices"] or args.topology))
        return 0
    train.run(config, new=args.new, assume_yes=args.yes, allow_data_change=args.allow_data_change, layout=layout,
              sinks=sinks)
    return 0


STAND_IN_DEVICE_MEMORY = 16 * 2**30  # a TPU v3 core, the generation of GPT-Neo's published configs
STAND_IN_DEVICE_FLOPS = 1e14
DEFAULT_LINK_BANDWIDTH = 1e11


def search_layouts(args, config) -> None:
    """--auto_layout / --auto_layout_and_mesh_shape (layout_search.py)."""
    import math

    import jax

    import layout_search
    from errors import ConfigError
    from mesh import device_memory_bytes
    from metrics import peak_flops_per_device
    from step_report import parse_memory

    devices = topology_devices(args.topology) if args.topology else jax.devices()
    stand_in = bool(SIMULATED["devices"] or args.topology)
    for flag, value in (("--search_seconds", args.search_seconds), ("--device_flops", args.device_flops),
                        ("--link_bandwidth", args.link_bandwidth)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} {value}: expected a positive number")
    if args.device_memory is not None:
        device_memory = parse_memory(args.device_memory)
    elif stand_in:
        device_memory = STAND_IN_DEVICE_MEMORY
        log.info("--auto_layout: simulated devices; fitting %.0f GiB per device (a TPU v3 core; set --device_memory)",
                 device_memory / 2**30)
    else:
        device_memory = device_memory_bytes(devices)[0]
    device_flops = args.device_flops or (config.peak_flops if config.peak_flops > 0 else None)
    if device_flops is None:
        device_flops = STAND_IN_DEVICE_FLOPS if stand_in else peak_flops_per_device(config.precision)[0]
        if not math.isfinite(device_flops):
            device_flops = STAND_IN_DEVICE_FLOPS
    layout_search.search(config, devices, device_memory, choose_mesh=args.auto_layout_and_mesh_shape,
                         seconds=args.search_seconds, device_flops=device_flops,
                         link_bandwidth=args.link_bandwidth or DEFAULT_LINK_BANDWIDTH, stand_in=stand_in)


if __name__ == "__main__":
    reuse_freed_memory()
    sys.exit(main())
