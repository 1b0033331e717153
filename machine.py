"""The machine a run is on: its CPU, what that CPU can do, and which of XLA:CPU's options run
fastest on it.

Figures measured on one machine do not carry to another: XLA:CPU's matmul kernels ran at
340-437 GFLOP/s (float32, 2048^2) on one 2-core machine and at 179 on another whose float32
peak is about 333, while PyTorch ran at about the same rate on both. So every benchmark records
`describe()`, and main.py asks `tune()` which XLA:CPU options and which of neomesh's speed-only
kernels (models/kernels.py) to use here, from a short probe cached per machine.

    python machine.py            # this machine's description and rates, as one JSON line
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("neomesh")

FLAGS_OF_INTEREST = ("fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


@functools.cache
def cpu_info() -> dict:
    """What /proc/cpuinfo and sysfs say about this CPU: cheap, no measurement."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if not name.strip():
                break  # the first processor's block is enough: the cores are alike
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    info = {
        "cpu_model": fields.get("model name", platform.processor() or "unknown"),
        "vendor": fields.get("vendor_id", "unknown"),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "flags": {flag: flag in flags for flag in FLAGS_OF_INTEREST},
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ghz": clock_ghz(fields),
    }
    return info


def clock_ghz(fields: dict) -> float | None:
    """The cores' top clock: cpufreq's maximum where the kernel exposes it, else the rate
    /proc/cpuinfo reports (under a hypervisor often the nominal one), else None."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        return round(float(fields["cpu MHz"]) / 1e3, 3)
    except (KeyError, ValueError):
        return None


def float32_peak(info: dict) -> tuple[float | None, str]:
    """(FLOP/s, how it was estimated): cores x GHz x FMA units x float32 lanes x 2 (an FMA is two
    flops). An estimate from the flags, not a datasheet: AVX-512 is taken as 16 lanes and two FMA
    units (Intel's server parts since Skylake-SP, AMD's Zen 5), except on AMD's Zen 4 (family 25
    with AVX-512), whose two FMA units are 256 bits wide and run a 512-bit FMA in two halves: 16
    lanes and one unit; AVX2 with FMA as 8 lanes and two units, anything else 4 lanes and one unit.
    Turbo and AVX-512 clock offsets are ignored: a CPU that boosts above its reported clock
    measures above the estimate."""
    flags, ghz, cores = info["flags"], info["ghz"], info["cores"]
    if not ghz or not cores:
        return None, "unknown clock: no estimate"
    if flags["avx512f"] and info.get("vendor") == "AuthenticAMD" and info.get("family") == 25:
        lanes, units, unit_words = 16, 1, "AVX-512 on Zen 4: 16 lanes x 1 FMA unit (two 256-bit halves)"
    elif flags["avx512f"]:
        lanes, units, unit_words = 16, 2, "AVX-512: 16 lanes x 2 FMA units"
    elif flags["avx2"] and flags["fma"]:
        lanes, units, unit_words = 8, 2, "AVX2: 8 lanes x 2 FMA units"
    else:
        lanes, units, unit_words = 4, 1, "SSE: 4 lanes x 1 unit"
    return (cores * ghz * 1e9 * units * lanes * 2,
            f"{cores} cores x {ghz:g} GHz x {unit_words} x 2 flop per FMA (an estimate from the CPU flags)")


def peak_not_below_measured(peak: float | None, formula: str, measured: dict) -> tuple[float | None, str]:
    """The estimated peak, raised to the fastest float32 matmul measured here where one ran above
    it: under a hypervisor the clock /proc/cpuinfo reports is often the nominal one while the
    cores boost above it (a Zen 4 reporting 2.6 GHz measured 187-211 GFLOP/s against an estimate
    of 166), and an MFU above 100% of a peak tells a reader nothing."""
    rates = {name: rate for name, rate in measured.items() if rate}
    if not rates:
        return peak, formula
    fastest = max(rates, key=rates.get)
    if peak is not None and rates[fastest] <= peak:
        return peak, formula
    if peak is None:
        return rates[fastest], f"{fastest}'s float32 matmul measured here (no clock to estimate from): a lower bound"
    return rates[fastest], (f"{fastest}'s float32 matmul measured here, {rates[fastest] / 1e9:.1f} GFLOP/s, ran above the "
                            f"estimate of {peak / 1e9:.1f} ({formula}): the cores run above the reported clock, "
                            "so the measurement is the peak's lower bound")


def memory_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
    """Bytes/s of reading a buffer far larger than any last-level cache, once per pass: the best of
    numpy's sum (one thread) and a compiled JAX sum (XLA's threads), each the best of `repeats`.
    What decoding, which streams every weight once per token, can hope for; a lower bound (a
    sum also adds)."""
    import jax
    import numpy as np

    host = np.ones(megabytes * 2**20 // 4, np.float32)
    on_device = jax.device_put(host)
    jax_sum = jax.jit(lambda buffer: buffer.sum())
    readers = [host.sum, lambda: jax_sum(on_device).block_until_ready()]
    best = float("inf")
    for read in readers:
        read()
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return host.nbytes / best


def torch_matmul_flops(size: int = 2048, repeats: int = 8) -> float | None:
    """PyTorch's float32 matmul FLOP/s at size^2, its default thread count (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.ones(size, size)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def describe(rates: bool = False, xla_roofline: float | None = None) -> dict:
    """The machine for a benchmark's JSON line. `rates`: also measure the float32 matmul rates of
    XLA (given as `xla_roofline` if the caller measured it) and PyTorch at 2048^2 and the memory
    bandwidth (~2 s)."""
    import jax

    info = dict(cpu_info())
    peak, formula = float32_peak(info)
    info |= {"float32_peak_gflops": None if peak is None else round(peak / 1e9, 1), "peak_formula": formula,
             "jax": jax.__version__, "backend": jax.default_backend(),
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if rates:
        if xla_roofline is None:
            from metrics import matmul_roofline

            xla_roofline = matmul_roofline(2048)
        torch_rate = torch_matmul_flops()
        info |= {"xla_matmul_gflops": round(xla_roofline / 1e9, 1),
                 "torch_matmul_gflops": None if torch_rate is None else round(torch_rate / 1e9, 1),
                 "memory_gb_per_s": round(memory_bandwidth() / 1e9, 1)}
        peak, formula = peak_not_below_measured(peak, formula, {"XLA": xla_roofline, "PyTorch": torch_rate})
        info |= {"float32_peak_gflops": None if peak is None else round(peak / 1e9, 1), "peak_formula": formula}
        warning = xla_below_torch_warning(xla_roofline, torch_rate)
        if warning:
            info["note"] = warning
    return info


# --- the probe: XLA:CPU's options and neomesh's kernels for this machine ---------------------

# XLA:CPU's ways of running dots, as per-compile options (for the probe, which tries them all in
# one process) and as the XLA_FLAGS that set them for a whole run (XLA reads those once, when JAX
# starts). In JAX 0.10 XLA's default hands dots to YNNPACK; "eigen" is XLA's own kernels.
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
XLA_DOT_OPTIONS = {
    "default": ({}, ""),
    "eigen": (_NO_YNN, "--xla_cpu_experimental_ynn_fusion_type="),
    "xnnpack": (_NO_YNN | {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
                "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot"),
    "onednn": (_NO_YNN | {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
               "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
               "--xla_cpu_experimental_onednn_fusion_type=dot"),
}
PROBED_FLAGS = ("xla_cpu_experimental_ynn_fusion_type", "xla_cpu_experimental_xnn_fusion_type", "xla_cpu_use_onednn",
                "xla_cpu_experimental_onednn_fusion_type")


def cache_path() -> Path:
    root = os.environ.get("NEOMESH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "neomesh")
    return Path(root) / "cpu_probe.json"


PROBE_VERSION = 5  # a probe that measures differently does not reuse what an older one chose


def machine_key(*parts) -> str:
    """This CPU, its flags, its cores, the JAX version and the probe's, with `parts` (the shape class)."""
    import jax

    info = cpu_info()
    flags = ",".join(flag for flag, present in info["flags"].items() if present)
    text = "|".join(map(str, (info["cpu_model"], info["family"], info["model"], flags, info["cores"],
                              f"jax {jax.__version__}", f"probe {PROBE_VERSION}", *parts)))
    return hashlib.sha1(text.encode()).hexdigest()[:16] + " " + text


def read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(key: str, choice: dict) -> None:
    entries = read_cache()
    entries[key] = choice
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(path)  # another process probing at once writes a whole file too
    except OSError as err:
        log.warning("cpu probe: could not cache the choice in %s (%s); the next run probes again", path, err)


def cached_choice(key: str, probe) -> dict:
    """The choice cached under `key` (its "why" marked cached), or else probe()'s, its "why" given
    the probe's duration, cached for the next run unless the probe marks it "uncached"."""
    cached = read_cache().get(key)
    if cached is not None:
        return cached | {"why": cached["why"] + " (cached)"}
    start = time.perf_counter()
    choice = probe()
    choice["why"] += f" (probed in {time.perf_counter() - start:.1f} s)"
    if not choice.pop("uncached", False):
        write_cache(key, choice)
    return choice


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports for this core (the last level), else 32 MiB."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=32 * 2**20)


def weight_bytes(dtype: str) -> int:
    """Bytes per weight in the dtype a run computes in (precision, decode_precision)."""
    return 2 if dtype == "bfloat16" else 4


def probe_products(config, decoding: bool) -> list[list[int]]:
    """[rows, in, out, per step] of the products the run spends its time in.

    Training: the MLP projection and its two backward products at the config's tokens per step
    (rows capped so the probe stays short), once each; they are bound by arithmetic.

    Decoding: one token of a batch through every block (attention's q, k, v and output
    projections, the MLP's) and the vocabulary projection, each shape counted as often as a token
    runs it. A token reads every weight once, far more bytes than any cache holds, so the probe
    reads its weights from memory too (`weight_copies`). The vocabulary alone outweighing the
    blocks, or one weight read again and again from the cache, hid weights-first's gain at batch 1
    on a Zen 4 (whole decodes 1.12x faster)."""
    if not decoding:
        rows = min(config.train_batch_size * config.n_ctx, 1024)
        return [[rows, config.n_embd, config.mlp_width, 1], [rows, config.mlp_width, config.n_embd, 1],
                [config.n_embd, rows, config.mlp_width, 1]]
    rows, embd, attended = max(1, config.predict_batch_size), config.n_embd, config.n_head * config.head_dim
    per_block = collections.Counter({(rows, embd, attended): 3})
    per_block[rows, attended, embd] += 1
    per_block[rows, embd, config.mlp_width] += 2 if config.mlp_glu else 1
    per_block[rows, config.mlp_width, embd] += 1
    return [*([*shape, count * config.n_layer] for shape, count in per_block.items()), [rows, embd, config.n_vocab, 1]]


def weight_copies(product, dtype: str) -> int:
    """How many distinct weights of `product` ([rows, in, out, per step]) in `dtype` a probe pass
    reads: as many as exceed the last-level cache by half, at most the step's count, so that each
    is read from memory as in the run (where a step reads every weight once)."""
    _, inner, out, count = product
    streamed = 3 * last_level_cache_bytes() // 2
    return min(count, max(1, -(-streamed // (inner * out * weight_bytes(dtype)))))


def described_products(products) -> str:
    return ", ".join(f"({rows}, {inner}, {out})" + (f" x{count}" if count > 1 else "")
                     for rows, inner, out, count in products)


def time_round_robin(passes: dict, rounds: int, option_of=lambda name: name, count_of=lambda name: 1.0,
                     budget: float | None = None) -> dict:
    """{name: median seconds of one call of passes[name]}, after one untimed call each, over up to
    `rounds` rounds in which every pass runs once in turn: a busy spell of a shared machine falls
    on every option alike (best-of-3 per option swung 30% on a 2-core VM). Where the first round
    shows that they would take over `budget` seconds, as many as fit, but at least 3: a 1.3B
    model's training products took 1.9 s a round.

    The passes add up to the options being chosen between (`option_of(name)`, each pass counted
    `count_of(name)` times). Once a majority of the rounds has run, an option whose every round
    took longer than every round of the fastest stops running (its median could not come out
    ahead), and timing ends when one option is left: a clear choice takes fewer rounds, a close
    one all. After three rounds of nine instead of five, a spell that slowed one order's passes
    for a while once dropped them (30.5 against 22.5 ms; nine rounds gave 19-21 against 22-25)."""
    for run in passes.values():
        run()
    seconds = {name: [] for name in passes}
    members = collections.defaultdict(list)
    for name in passes:
        members[option_of(name)].append(name)
    racing = set(members)
    done = 0
    while done < rounds and (len(racing) > 1 or len(members) == 1):
        for name, run in passes.items():
            if option_of(name) in racing:
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        done += 1
        if done == 1 and budget is not None and (first_round := sum(taken[0] for taken in seconds.values())) > 0:
            rounds = max(min(rounds, 3), min(rounds, int(budget / first_round)))
        if done > rounds // 2 and len(racing) > 1:
            totals = {option: [sum(count_of(name) * seconds[name][i] for name in members[option]) for i in range(done)]
                      for option in racing}
            fastest = min(totals, key=lambda option: statistics.median(totals[option]))
            racing = {option for option in racing if option == fastest or min(totals[option]) <= max(totals[fastest])}
    return {name: statistics.median(taken) for name, taken in seconds.items() if taken}


DECODE_ORDERS = ("rows_first", "weights_first")  # decode_product's values: models/kernels.py


def weight_shape(inner: int, out: int, order: str) -> tuple[int, int]:
    """A weight as `order` (DECODE_ORDERS) reads it: [in, out], or out-first."""
    return (inner, out) if order == "rows_first" else (out, inner)


def multiply_in(order: str):
    """The product as the model asks for it in `order` (models/kernels.py: `product`, `weights_first`)."""
    from models.kernels import product, weights_first

    return {"rows_first": product, "weights_first": weights_first}[order]


def product_operands(products, dtypes: dict, orders) -> dict:
    """{order: [(x, [w, ...]), ...]}: per product of `products` (probe_products) its rows and its
    weight_copies, for each of `orders` (DECODE_ORDERS) in the order it reads them: [in, out], or
    out-first, each copy a buffer of its own, in dtypes[order][index] (streamed_dtypes)."""
    import jax.numpy as jnp

    def operands(product, dtype, order):
        rows, inner, out, _ = product
        return jnp.ones((rows, inner), dtype) / inner, [jnp.ones(weight_shape(inner, out, order), dtype)
                                                        for _ in range(weight_copies(product, dtype))]

    return {order: [operands(product, dtypes[order][index], order) for index, product in enumerate(products)]
            for order in orders}


def streamed_dtypes(products, dtype: str, orders, options: dict, decoding: bool) -> dict:
    """{option: {order: [dtype per product]}, or None where the option's compile fails}: the dtype
    in which a decoding loop multiplies each product's weight of `dtype`, under each of `options`
    ({name: compiler options, or None for this process's own}). XLA:CPU 0.10 runs a one-row
    bfloat16 product only in float32, as do its own kernels at any rows: the loop converts the
    weight once before it starts, carries the float32 copy and streams float32 at every step
    (YNNPACK takes bfloat16 from two rows). The probe times what the loop runs: one-row bfloat16
    products timed outside a loop took 41-43 ms a token at 125M on a Zen 4 (XLA converts the
    weights at every call there), against 19-22 for the float32 products the loop runs, and the
    order was chosen between kernels no loop runs. Read from the weights a compiled loop carries;
    training's products are not in a loop and keep `dtype`."""
    import jax
    import jax.numpy as jnp

    if not decoding or dtype == "float32":
        return {name: {order: [dtype] * len(products) for order in orders} for name in options}
    shapes = {order: [weight_shape(inner, out, order) for _, inner, out, _ in products] for order in orders}

    def lowered(order):
        multiply = multiply_in(order)

        def loop(steps, rows, weights):
            step = lambda _, rows: [x + jnp.mean(multiply(x, w), axis=1, keepdims=True).astype(x.dtype)  # noqa: E731
                                    for x, w in zip(rows, weights)]
            return jax.lax.fori_loop(0, steps, step, rows)

        return jax.jit(loop).lower(jax.ShapeDtypeStruct((), jnp.int32),
                                   [jax.ShapeDtypeStruct((rows, inner), dtype) for rows, inner, _, _ in products],
                                   [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes[order]])

    def carried(name, order, program):
        try:
            text = program.compile(compiler_options=options[name]).as_text()
        except Exception:  # noqa: BLE001 - a library this XLA build lacks fails in its own way
            return None
        loops = re.findall(r"= \((.*?)\) while\(", text)
        if not loops:
            log.warning("cpu probe: no loop found in XLA's program of the decoding products under %s; timing them "
                        "in %s as asked", name, dtype)
        # as given: the transposed shape is another product's in a block (the MLP's two weights)
        return ["float32" if any(f"f32[{a},{b}]" in carry for carry in loops) else dtype for a, b in shapes[order]]

    programs = {order: lowered(order) for order in orders}
    found = side_by_side({(name, order): functools.partial(carried, name, order, program)
                          for name in options for order, program in programs.items()})
    return {name: None if any(found[name, order] is None for order in orders) else
            {order: found[name, order] for order in orders} for name in options}


def product_passes(operands: dict, orders, options: dict) -> dict:
    """{(option, order, index): one pass over the copies of product `index`} for each of
    `options` ({name: compiler options, or None for the process's own}) under which the products
    compile (an XLA build may lack a library): the product as the model asks for it
    (multiply_in). A pass is one compiled program over all the copies, as a decoding step is: a
    call per copy cost about as much as a small product itself and hid the orders' difference.
    The programs compile side by side."""
    import jax

    lowered = {}
    for order in orders:
        multiply = multiply_in(order)
        every_copy = jax.jit(lambda x, weights, multiply=multiply: [multiply(x, w) for w in weights])
        lowered |= {(order, index): every_copy.lower(x, weights) for index, (x, weights) in enumerate(operands[order])}

    def compiled(name, key):
        try:
            return lowered[key].compile(compiler_options=options[name])
        except Exception:  # noqa: BLE001 - a library this XLA build lacks fails in its own way
            return None

    runs = side_by_side({(name, key): functools.partial(compiled, name, key) for name in options for key in lowered})
    failed = {name for (name, _), run in runs.items() if run is None}
    return {(name, *key): lambda run=run, key=key: jax.block_until_ready(run(*operands[key[0]][key[1]]))
            for (name, key), run in runs.items() if name not in failed}


def side_by_side(work: dict) -> dict:
    """{key: work[key]()}, one thread per core: how the probes compile their programs, which XLA
    does off the GIL."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=cpu_info()["cores"] or 1) as pool:
        return dict(zip(work, pool.map(lambda job: job(), work.values())))


def passes_per_step(products, operands: dict, order: str, index: int) -> float:
    """How many of product `index`'s timed passes (over its copies in `operands`) a step's count makes."""
    return products[index][3] / len(operands[order][index][1])


def seconds_per_step(products, operands: dict, seconds: dict, orders) -> dict:
    """{order: seconds of one step's products}: each product's timed pass (`seconds` keyed by
    (order, index), as product_passes) over its copies (`operands`), scaled to the count a step runs."""
    return {order: sum(seconds[order, index] * passes_per_step(products, operands, order, index)
                       for index in range(len(products))) for order in orders}


_DOT_PROBE = """
import json, sys
products, options, orders, rounds, dtype, decoding, repository = (json.loads(sys.argv[1]), json.loads(sys.argv[2]),
                                                                  json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                                                                  sys.argv[6] == "decoding", sys.argv[7])
sys.path.insert(0, repository)
from machine import time_options
print(json.dumps(time_options(products, options, orders, rounds, dtype, decoding)))
"""
PROBE_ROUNDS = 9
PROBE_ROUNDS_SECONDS = 2.5  # the timed rounds' total where they are long (not the compiles')


def time_options(products, options: dict, orders, rounds: int, dtype: str, decoding: bool) -> dict:
    """{"seconds": {option: {order: seconds of one step's products} or None where it fails},
    "streamed": {option: {order: [dtype per product]}} of the options timed}: each of `options`
    (compiler options by name) on the products in the dtypes it streams them in
    (streamed_dtypes), every option and order taking turns (time_round_robin)."""
    streamed = {name: dtypes for name, dtypes in streamed_dtypes(products, dtype, orders, options, decoding).items()
                if dtypes is not None}
    group_of = {name: json.dumps(dtypes, sort_keys=True) for name, dtypes in streamed.items()}
    # options that stream the same dtypes share their operands
    operands = {group: product_operands(products, json.loads(group), orders) for group in set(group_of.values())}
    passes = {}
    for group in operands:
        passes |= product_passes(operands[group], orders, {name: options[name] for name in group_of if group_of[name] == group})

    seconds = time_round_robin(passes, rounds, option_of=lambda key: key[:2],  # an option in one order
                               count_of=lambda key: passes_per_step(products, operands[group_of[key[0]]], *key[1:]),
                               budget=PROBE_ROUNDS_SECONDS)
    timed = {name for name, _, _ in seconds}
    return {"seconds": {name: seconds_per_step(products, operands[group_of[name]],
                                               {key[1:]: s for key, s in seconds.items() if key[0] == name}, orders)
                        if name in timed else None for name in options},
            "streamed": {name: dtypes for name, dtypes in streamed.items() if name in timed}}


def time_dot_options(products, dtype: str = "float32", orders=("rows_first",), decoding: bool = False) -> dict:
    """time_options over XLA_DOT_OPTIONS, PROBE_ROUNDS rounds, in one fresh process: the options
    are given per compile there, so that this process's JAX has not started and still reads the
    chosen one from XLA_FLAGS. Every option None where the probe fails."""
    options = {name: compiler_options for name, (compiler_options, _) in XLA_DOT_OPTIONS.items()}
    try:
        done = subprocess.run([sys.executable, "-c", _DOT_PROBE, json.dumps(products), json.dumps(options), json.dumps(list(orders)),
                               str(PROBE_ROUNDS), dtype, "decoding" if decoding else "training",
                               str(Path(__file__).resolve().parent)],
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=180)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return {"seconds": dict.fromkeys(XLA_DOT_OPTIONS), "streamed": {}}


def streamed_note(streamed: dict, dtype: str) -> str:
    """For a probe's log line: under which options (where it timed several) a decoding loop
    multiplies which products in another dtype than `dtype` (streamed_dtypes' findings); else empty."""
    options_by_finding = collections.defaultdict(list)
    for name, by_order in streamed.items():
        finding = ", ".join(f"{order} in {'/'.join(sorted(set(dtypes) - {dtype}))}"
                            + ("" if dtype not in dtypes else f" ({sum(d != dtype for d in dtypes)} of {len(dtypes)} products)")
                            for order, dtypes in by_order.items() if set(dtypes) - {dtype})
        if finding:
            options_by_finding[finding].append(name)
    under = (lambda names: f" under {', '.join(names)}") if len(streamed) > 1 else (lambda names: "")
    return "".join(f";{under(names)} the loop multiplies {finding}, its weights converted before it"
                   for finding, names in options_by_finding.items())


def choose_xla_dot_option(config, decoding: bool) -> dict:
    """{"option": name, "flags": XLA_FLAGS text, "seconds": {name: s}, "why": text}: the fastest
    of XLA_DOT_OPTIONS on the run's products, in the dtype the run computes them in (the dot
    libraries differ most in bfloat16: XLA's own kernels convert it to float32), or when decoding
    the dtype each library's decoding loop streams them in (streamed_dtypes); for decoding each
    library is timed in both of decode_product's orders and judged by its faster one (which
    choose_decode_product then picks under it). Cached per machine and shape class."""
    products = probe_products(config, decoding)
    dtype = config.decode_precision if decoding else config.precision
    orders = DECODE_ORDERS if decoding else DECODE_ORDERS[:1]

    def probe() -> dict:
        timed = time_dot_options(products, dtype, orders, decoding)
        measured = timed["seconds"]
        seconds = {name: None if by_order is None else min(by_order.values()) for name, by_order in measured.items()}
        working = {name: s for name, s in seconds.items() if s is not None}
        best = min(working, key=working.get) if working else "default"
        # another library must win clearly: within the noise of a shared machine, keep XLA's default
        if best != "default" and seconds.get("default") and working[best] > 0.9 * seconds["default"]:
            best = "default"
        rates = ", ".join(f"{name} failed" if by_order is None else
                          f"{name} " + " / ".join(f"{s * 1e3:.1f}" for s in by_order.values()) + " ms"
                          for name, by_order in measured.items())
        return {"option": best, "flags": XLA_DOT_OPTIONS[best][1], "seconds": seconds, "by_order": measured,
                "why": f"{'decoding' if decoding else 'training'} products [{described_products(products)}] in {dtype}"
                       + (f" ({' / '.join(orders)})" if decoding else "") + f": {rates}"
                       + streamed_note(timed["streamed"], dtype)
                       + ("" if working else "; XLA's default kept, probed again next run"),
                "uncached": not working}  # a probe that timed nothing (a timeout, a crash) is not a finding

    return cached_choice(dot_option_key(products, dtype, decoding), probe)


def dot_option_key(products, dtype: str, decoding: bool) -> str:
    return machine_key("xla dots", "decode" if decoding else "train", products, dtype)


def choose_decode_product(config) -> dict:
    """{"decode_product": rows_first | weights_first, "why": ...}: the faster order of a decoding
    step's products (models/kernels.py `weights_first`) on one token's products at
    predict_batch_size rows (probe_products), in decode_precision as the decoding loop streams it
    (streamed_dtypes), under the dot library in force.
    Weights first must win by 5%, the probe's spread between runs on a 2-core VM, and its copy of
    the block weights (`weights_first_copy_bytes`) must take at most half the memory available
    now. Where the dot probe (choose_xla_dot_option) chose the library in force, its timings of
    the two orders under it are taken rather than measured again. The timings are cached per
    machine, products, dtype and dot library; the memory is looked at on every run."""
    if config.decode_product != "auto":
        return {"why": "decode_product set in the config"}
    products = probe_products(config, decoding=True)
    dtype = config.decode_precision

    def probe() -> dict:
        dot_probe = read_cache().get(dot_option_key(products, dtype, decoding=True))
        if dot_probe and dot_probe["flags"] == dot_flags_in_force() and dot_probe["by_order"].get(dot_probe["option"]):
            # the library in force is the one the dot probe chose, and it timed both orders under it
            seconds, source = dot_probe["by_order"][dot_probe["option"]], f"the dot probe's, under {dot_probe['option']}"
        else:
            timed = time_options(products, {"in force": None}, DECODE_ORDERS, PROBE_ROUNDS, dtype, decoding=True)
            seconds = timed["seconds"]["in force"]
            source = "timed under the dot library in force" + streamed_note(timed["streamed"], dtype)
        chosen = "weights_first" if seconds["weights_first"] < 0.95 * seconds["rows_first"] else "rows_first"
        return {"decode_product": chosen,
                "why": f"decoding products [{described_products(products)}] in {dtype}: "
                       + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in seconds.items()) + f" ({source})"}

    choice = cached_choice(machine_key("decode product", products, dtype, dot_flags_in_force() or "default dots"), probe)
    copy, available = weights_first_copy_bytes(products, dtype), available_memory_bytes()
    if choice["decode_product"] == "weights_first" and available is not None and copy > available / 2:
        choice = {"decode_product": "rows_first",
                  "why": choice["why"] + f"; but weights first would copy {copy / 1e9:.2f} GB of weights with "
                                         f"{available / 1e9:.2f} GB of memory available"}
    return choice


def weights_first_copy_bytes(products, dtype: str) -> int:
    """Bytes of the out-first copy of the block weights that weights-first decoding keeps while
    sampling: every product's but the vocabulary's (the last), whose table is stored out-first."""
    return sum(count * inner * out * weight_bytes(dtype) for _, inner, out, count in products[:-1])


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what the kernel can give without swapping), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


ATTENTION_KERNELS = ("blocked", "plain")  # blocked first: what attention_kernel auto means on a CPU unprobed
ATTENTION_PROBE_HEADS = 2  # heads are independent: more would only multiply both kernels' time
ATTENTION_PROBE_ROUNDS = 3  # the kernels differ by 2-4x at n_ctx 2048 (not the dot libraries' 10%); a round ~0.4 s there


def attention_kernel_layers(config) -> collections.Counter:
    """{kind: layers} of the layers whose attention attention_kernel decides: global and local,
    but not a global layer with num_mem_kv memory nor any layer under mlm_training (plain only)."""
    if config.mlm_training:
        return collections.Counter()
    return collections.Counter(kind for kind in config.layer_kinds
                               if kind == "local" or (kind == "global" and not config.num_mem_kv))


def time_attention_kernels(config) -> dict | None:
    """{kernel: seconds} of the forward and backward of the config's causal softmax attention
    (models/attention.py `self_attention`, by each of ATTENTION_KERNELS) at one row of n_ctx and
    up to ATTENTION_PROBE_HEADS heads, in `precision`: each softmax layer kind timed once and
    counted once per layer of that kind (attention_kernel_layers). None where no layer takes the
    choice."""
    import jax

    from models import attention
    from models.gpt2 import compute_dtype

    counts = attention_kernel_layers(config)
    if not counts:
        return None
    shape = (1, config.n_ctx, min(config.n_head, ATTENTION_PROBE_HEADS), config.head_dim)
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), shape, compute_dtype(config)) for i in range(4))

    def forward_and_backward(kernel: str, kind: str):
        attend = functools.partial(attention.self_attention, reach=attention.window(kind, config), memory=None,
                                   config=config.replace(attention_kernel=kernel), layout=None, rng=None)
        return jax.jit(lambda q, k, v, g: jax.vjp(attend, q, k, v)[1](g)).lower(q, k, v, cotangent)

    programs = {(kernel, kind): forward_and_backward(kernel, kind) for kernel in ATTENTION_KERNELS for kind in counts}
    compiled = side_by_side({name: lowered.compile for name, lowered in programs.items()})
    seconds = time_round_robin({name: lambda run=run: jax.block_until_ready(run(q, k, v, cotangent))
                                for name, run in compiled.items()}, ATTENTION_PROBE_ROUNDS,
                               option_of=lambda name: name[0], count_of=lambda name: counts[name[1]])
    return {kernel: sum(count * seconds[kernel, kind] for kind, count in counts.items()) for kernel in ATTENTION_KERNELS}


def choose_kernels(config) -> dict:
    """{"attention_kernel": blocked | plain, "why": ...} where the config leaves attention_kernel
    auto: the faster on the attention alone at the config's shapes (time_attention_kernels; the
    two compute the same thing). Cached per machine, shapes, dtype and dot library.

    cpu_backward is not probed: what it changes shows only in a train step of several layers (on
    a Zen 4 at the 125M shape a layer's projections alone took 166 ms written and 169 plain, a
    4-layer step 1.57 s and 1.78 s: the written backward keeps fusions from transposing and
    recomputing activations, and the residual stream's gradient from being recomputed in every
    layer), and timing such steps took 20-60 s. Its written backward won by 13-30% on every
    CPU measured (Zen 4, Zen 5, an AMX Xeon), so `auto` means written on a CPU."""
    if config.attention_kernel != "auto":
        return {"why": "attention_kernel set in the config"}
    if not attention_kernel_layers(config):
        return {"why": "no causal softmax attention layer takes the choice"}

    def probe() -> dict:
        seconds = time_attention_kernels(config)
        return {"attention_kernel": min(seconds, key=seconds.get),
                "why": f"attention_kernel {' vs '.join(f'{k} {s * 1e3:.1f} ms' for k, s in seconds.items())} (each "
                       f"softmax layer's attention in {config.precision} at n_ctx {config.n_ctx}, "
                       f"{min(config.n_head, ATTENTION_PROBE_HEADS)} heads, forward and backward)"}

    # the dot library in force changes what the kernels cost, so a choice is kept per library
    return cached_choice(machine_key("attention kernel", config.n_ctx, config.n_head, config.head_dim,
                                     sorted(set(config.layer_kinds)), config.local_attention_radius, config.num_mem_kv,
                                     config.mlm_training, config.precision, dot_flags_in_force() or "default dots"),
                         probe)


def dot_flags_in_force() -> str:
    """The XLA_FLAGS that choose a dot library (PROBED_FLAGS), as set now; empty: XLA's default."""
    return " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split() if any(p in flag for p in PROBED_FLAGS))


def user_sets_dot_flags() -> bool:
    return bool(dot_flags_in_force())


def set_xla_dot_option(config, decoding: bool) -> dict | None:
    """Before JAX starts its backend: the probed XLA:CPU dot option into XLA_FLAGS (unless the
    config says cpu_probe off, the run is not on a CPU, or XLA_FLAGS already chooses one)."""
    from main import runs_on_accelerator

    if config.cpu_probe == "off" or runs_on_accelerator() or user_sets_dot_flags():
        return None
    choice = choose_xla_dot_option(config, decoding)
    if choice["flags"]:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), choice["flags"]]))
    log.info("cpu probe: XLA dots by %s; %s", choice["option"], choice["why"])
    return choice


def tune(config, decoding: bool = False):
    """The config with attention_kernel (training) or decode_product (`decoding`) chosen for this
    machine where it is auto (cpu_probe auto, on a CPU), the choice logged with its reason. Call
    after set_xla_dot_option and before the first compile."""
    import jax

    if config.cpu_probe == "off" or jax.default_backend() != "cpu":
        return config
    choice = choose_decode_product(config) if decoding else choose_kernels(config)
    chosen = {key: value for key, value in choice.items() if key != "why"}
    log.info("cpu probe: %s; %s", ", ".join(f"{k} {v}" for k, v in chosen.items()) or "nothing to choose",
             choice["why"])
    return config.replace(**chosen)


def xla_below_torch_warning(xla_rate: float, torch_rate: float | None) -> str | None:
    """A note for the log and the benchmarks where XLA's float32 matmul trails PyTorch's by over 20%."""
    if torch_rate and xla_rate < 0.8 * torch_rate:
        return (f"XLA:CPU's float32 matmul runs at {xla_rate / 1e9:.0f} GFLOP/s here, {xla_rate / torch_rate:.0%} of "
                f"PyTorch's {torch_rate / 1e9:.0f}: on this CPU neomesh is bounded by XLA's kernels")
    return None


if __name__ == "__main__":
    print(json.dumps(describe(rates=True)))
