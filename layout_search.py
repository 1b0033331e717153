"""`main.py --auto_layout` and `--auto_layout_and_mesh_shape`: search meshes and layouts for a config.

1. **Enumerate.** Meshes of up to four axes (x, y, z, w, largest first) whose sizes multiply to the
   device count, or only the config's own mesh for `--auto_layout`; for each, every layout of the
   dimensions worth splitting (`SEARCHED`) over its axes that Mesh-TensorFlow's rules allow: a
   dimension divides by its axis, no tensor uses an axis twice (`batch` meets every other
   dimension in the activations, so its axis is its own, except for `experts`, which GSPMD moves
   with all-to-alls), and every axis splits something. Each with and without `fsdp_axes` over the
   batch axis. Layouts that differ only by swapping two axes of one size count once.
2. **Estimate** each from shapes alone: per-device parameter and optimizer bytes from the same
   placement rule training uses (`MeshLayout.parameter_spec`), activations by
   `step_report.accelerator_estimate`, compute divided by the axes that split it, and a rough
   communication figure. This only orders what is compiled, and drops layouts that are far
   (`ESTIMATE_MARGIN`) beyond the memory budget.
3. **Compile** the most promising train steps ahead of time, in that order, until the time budget is
   spent, `workers` at a time. A model whose layers repeat (GPT-Neo's global/local pattern)
   compiles with k and 2k of its layers (k: whole periods, at least MIN_CUT_LAYERS), and every
   figure is extrapolated linearly to n_layer: a 24-layer model for the cost of a 2- and a 4-layer one.
4. **Rank** those that fit the device memory by step time:

       FLOPs per device / device_flops + sum over collectives of traffic / link_bandwidth

   with the compiled cost analysis's FLOPs (its loop body, counted once by XLA, times the
   microbatch count) and the compiled step's collectives (`step_report.collectives`), whose
   traffic per device is 2(n-1)/n of the bytes for an all-reduce over n devices, (n-1)/n for an
   all-gather, reduce-scatter or all-to-all, and the bytes for a collective-permute. Memory is the
   compiled figure on an accelerator; where XLA:CPU stands in, the accelerator estimate bounded by
   the compiled temporaries, as `--dry_run` reports it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from errors import ConfigError
from mesh import MeshLayout, parse_mesh_shape

AXIS_NAMES = ("x", "y", "z", "w")
SEARCHED = ("batch", "heads", "intermediate_expanded", "vocab", "embd", "memory_length", "experts")
ESTIMATE_MARGIN = 2.0  # compile only what the estimate puts within this factor of the memory budget
TRAFFIC = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
           "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
           "collective-permute": lambda n: 1.0}
# step 2's guess of the activation-sized all-reduces a split dimension costs per layer, forward and
# backward: heads and the MLP's width one each way; embd every projection that contracts it
ACTIVATION_REDUCTIONS = {"heads": 2, "intermediate_expanded": 2, "embd": 8, "vocab": 2, "memory_length": 2,
                         "experts": 2}
# the cut-down compiles hold at least this many layers: a one-layer step's temporaries do not grow as
# a deeper one's do (gpt3_XL_256_Pile's extrapolated from 1 and 2 layers: 17.0 GiB; from 2 and 4:
# 23.5; compiled whole: 24.5)
MIN_CUT_LAYERS = 2
GIB = 2**30


@dataclass
class Candidate:
    mesh_shape: dict[str, int]
    layout: dict[str, str]
    fsdp_axes: tuple[str, ...] = ()
    estimate: dict = field(default_factory=dict)  # from shapes alone (step 2)
    compiled: dict | None = None  # from the compiled step, extrapolated to n_layer (steps 3, 4)
    error: str | None = None

    @property
    def texts(self) -> dict[str, str]:
        return {"mesh_shape": ",".join(f"{a}:{n}" for a, n in self.mesh_shape.items()),
                "layout": ",".join(f"{d}:{a}" for d, a in self.layout.items()),
                "fsdp_axes": ",".join(self.fsdp_axes)}

    def settings(self) -> str:
        """The `--set` arguments that train with this candidate."""
        return " ".join(f"--set {key}={value}" for key, value in self.texts.items() if value or key != "fsdp_axes")


def meshes(device_count: int, max_axes: int = 4) -> list[dict[str, int]]:
    """Every mesh of up to `max_axes` axes, each of size 2 or more and no larger than the one
    before, whose sizes multiply to `device_count` (one device: the empty mesh)."""
    found: list[tuple[int, ...]] = []

    def split(rest: int, largest: int, sizes: tuple[int, ...]) -> None:
        if rest == 1:
            found.append(sizes)
            return
        if len(sizes) == max_axes:
            return
        for size in range(min(rest, largest), 1, -1):
            if rest % size == 0:
                split(rest // size, size, sizes + (size,))

    split(device_count, device_count, ())
    return [dict(zip(AXIS_NAMES, sizes)) for sizes in found]


def conflicts(config) -> set[frozenset]:
    """Pairs of searched dimensions that some tensor holds together, so that they may not share
    a mesh axis: from every weight's dimensions, and `batch` with every other dimension (the
    activations), `heads` with `memory_length` (the attention scores)."""
    from models import gpt2

    pairs = set()
    for weight in _leaves(gpt2.weights(config)):
        held = [dim for dim in weight.dims if dim in SEARCHED]
        pairs |= {frozenset(pair) for pair in itertools.combinations(held, 2)}
    pairs |= {frozenset(("batch", dim)) for dim in SEARCHED if dim not in ("batch", "experts")}
    pairs.add(frozenset(("heads", "memory_length")))
    return pairs


def _leaves(tree):
    import jax

    from models import gpt2

    return jax.tree.leaves(tree, is_leaf=gpt2.is_weight)


def layouts(config, mesh_shape: dict[str, int]) -> list[tuple[dict[str, str], tuple[str, ...]]]:
    """(layout, fsdp_axes) pairs for one mesh (the module docstring's step 1)."""
    sizes = config.dim_sizes | {"batch": config.train_batch_size}
    dims = [dim for dim in SEARCHED if sizes.get(dim, 1) > 1 and (dim != "experts" or config.moe_layers)]
    clashes = conflicts(config)
    axes = list(mesh_shape)
    found, seen = [], set()
    for choice in itertools.product([None, *axes], repeat=len(dims)):
        layout = {dim: axis for dim, axis in zip(dims, choice) if axis is not None}
        if any(sizes[dim] % mesh_shape[axis] for dim, axis in layout.items()):
            continue
        if set(layout.values()) != set(axes):  # an axis that splits nothing only repeats work
            continue
        by_axis: dict[str, list[str]] = {}
        for dim, axis in layout.items():
            by_axis.setdefault(axis, []).append(dim)
        if any(frozenset(pair) in clashes for held in by_axis.values() for pair in itertools.combinations(held, 2)):
            continue
        for fsdp in ((), (layout["batch"],)) if "batch" in layout else ((),):
            key = frozenset(Counter((mesh_shape[axis], frozenset(held), axis in fsdp)
                                    for axis, held in by_axis.items()).items())
            if key not in seen:  # the same up to swapping axes of one size
                seen.add(key)
                found.append((layout, fsdp))
    return found


class _Shapes:
    """What step 2 needs of a config, worked out once: each distinct weight shape and how often it
    occurs, the optimizer state's bytes per parameter byte, and the training FLOPs per step."""

    def __init__(self, config):
        import jax

        import model_fns
        from models import gpt2
        from models.attention import KINDS
        from optimizers import make_optimizer

        trained = model_fns.trained_part(gpt2.weights(config), config)
        self.weights = Counter((w.dims, gpt2.shape_of(w, config)) for w in _leaves(trained))
        tokens = config.train_batch_size * config.n_ctx
        # each projection's share of the step's FLOPs, split by whatever splits its weight (or the
        # batch); what the layers compute beyond their projections (attention scores) by heads
        # and memory_length
        self.projection_flops = Counter()
        for (dims, shape), count in self.weights.items():
            if len(dims) >= 2 and not set(dims) & set(gpt2.NOT_PROJECTIONS) and dims[0] != "experts":
                self.projection_flops[(dims, shape)] += 6 * math.prod(shape) * count * tokens
        self.attention_flops = sum(KINDS[kind].flops(config) for kind in config.layer_kinds) * tokens
        shapes = model_fns.trained_part(gpt2.param_shapes(config), config)
        parameter_bytes = sum(math.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(shapes))
        optimizer_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                              for leaf in jax.tree.leaves(jax.eval_shape(make_optimizer(config).init, shapes)))
        self.optimizer_ratio = optimizer_bytes / max(parameter_bytes, 1)
        self.flops = model_fns.flops_per_token(config) * tokens


def estimate(config, shapes: _Shapes, candidate: Candidate) -> dict:
    """Step 2: per-device bytes and a rough step time, from shapes alone (a ConfigError where the
    layout cannot hold the config: a microbatch count that does not divide, say)."""
    import model_fns
    import step_report

    layout = MeshLayout(SimpleNamespace(shape=candidate.mesh_shape), candidate.layout, candidate.fsdp_axes)
    parameters = 0
    layout_only = 0  # per-device parameter bytes without fsdp_axes: what a gradient all-reduce moves
    plain = MeshLayout(layout.mesh, candidate.layout)
    for (dims, shape), count in shapes.weights.items():
        full = math.prod(shape) * 4 * count
        parameters += full // _shards(layout.parameter_spec(dims, shape), candidate.mesh_shape)
        layout_only += full // _shards(plain.spec(dims, shape), candidate.mesh_shape)
    microbatches = model_fns.microbatch_count(config, layout)
    state = {"params": parameters, "opt_state": int(parameters * shapes.optimizer_ratio)}
    memory = step_report.accelerator_estimate(config, layout, microbatches, state)["total"]
    batch = layout.batch_axis_size
    flops = sum(work / (batch * _shards(plain.spec(dims, shape), candidate.mesh_shape))
                for (dims, shape), work in shapes.projection_flops.items())
    scores_split = math.prod(candidate.mesh_shape[candidate.layout[dim]] for dim in ("heads", "memory_length")
                             if dim in candidate.layout)
    flops += shapes.attention_flops / (batch * scores_split)
    # what neither counts (experts, the rest): as finely split as the mesh's used axes split it
    split = math.prod(candidate.mesh_shape[axis] for axis in set(candidate.layout.values()))
    flops += max(shapes.flops - sum(shapes.projection_flops.values()) - shapes.attention_flops, 0) / split
    sizes = config.dim_sizes
    local = {dim: sizes[dim] // (candidate.mesh_shape[candidate.layout[dim]] if dim in candidate.layout else 1)
             for dim in ("embd", "sequence")}
    rows = config.train_batch_size // layout.batch_axis_size
    activation = rows * local["sequence"] * sizes["embd"] * (2 if config.precision == "bfloat16" else 4)
    traffic = 0.0
    batch_axis = candidate.layout.get("batch")
    if batch_axis:
        n = candidate.mesh_shape[batch_axis]
        traffic += (3 if candidate.fsdp_axes else 2) * layout_only * (n - 1) / n
    for dim, axis in candidate.layout.items():
        if dim != "batch":  # all-reduces of the activations the split projections contract over
            n = candidate.mesh_shape[axis]
            layers = 1 if dim == "vocab" else config.n_layer
            traffic += ACTIVATION_REDUCTIONS.get(dim, 2) * layers * activation * 2 * (n - 1) / n
    return {"per_device_bytes": memory, "flops": flops, "traffic_bytes": traffic}


def _shards(spec, mesh_shape: dict[str, int]) -> int:
    count = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            count *= mesh_shape[axis] if axis else 1
    return count


def repeating_period(config) -> int | None:
    """The fewest layers after which the layers' kinds (attention kind, MoE or not) repeat, when
    the model holds at least two such periods and shares no parameters across layers; else None
    (the model is compiled whole)."""
    if config.share_parameters:
        return None
    kinds = [(kind, config.is_moe_layer(layer)) for layer, kind in enumerate(config.layer_kinds)]
    for period in range(1, config.n_layer // 2 + 1):
        if config.n_layer % period == 0 and all(kinds[i] == kinds[i % period] for i in range(config.n_layer)):
            return period
    return None


def with_layers(config, count: int):
    """The config cut to its first `count` layers (their kinds and MoE layers kept)."""
    kinds = config.layer_kinds[:count]
    return config.replace(n_layer=count, attention_types=[[kinds, 1]],
                          moe_layers=[layer for layer in (config.moe_layers or ()) if layer < count] or None)


def measure(config, candidate: Candidate, devices, stand_in: bool) -> dict:
    """Steps 3 and 4 for one candidate: compile its train step (or two cut-down ones, extrapolated
    to n_layer) and return its per-device bytes, FLOPs and collective traffic."""
    import model_fns
    import step_report
    import train
    from mesh import build_mesh_layout

    chosen = config.replace(**candidate.texts)
    period = repeating_period(chosen)
    cut = period and period * -(-MIN_CUT_LAYERS // period)  # whole periods, at least MIN_CUT_LAYERS layers
    counts = [cut, 2 * cut] if cut and 2 * cut < chosen.n_layer else [chosen.n_layer]
    runs = []
    for count in counts:
        cut = chosen if count == chosen.n_layer else with_layers(chosen, count)
        layout = build_mesh_layout(cut, devices)
        compiled, _, seconds = train.compile_train_step(cut, layout)
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        found = step_report.collectives(compiled.as_text(), dict(layout.mesh.shape))
        runs.append({"temporaries": memory.temp_size_in_bytes if memory else 0,
                     "sent": {kind_axes: figures["bytes"] for kind_axes, figures in found.items()},
                     "flops": float((cost or {}).get("flops", 0.0)), "seconds": seconds})

    def at_n_layer(values: list[float]) -> float:
        if len(values) == 1:
            return values[0]
        return max(values[0] + (values[1] - values[0]) * (chosen.n_layer / counts[0] - 1), 0.0)

    layout = build_mesh_layout(chosen, devices)
    _, shardings, state_shapes = train.abstract_state(chosen, layout)
    state = {part: step_report.sharded_bytes(state_shapes[part], shardings[part]) for part in ("params", "opt_state")}
    microbatches = model_fns.microbatch_count(chosen, layout)
    temporaries = at_n_layer([run["temporaries"] for run in runs])
    if stand_in or layout.mesh.devices.flat[0].platform == "cpu":
        total = step_report.accelerator_estimate(chosen, layout, microbatches, state, int(temporaries))["total"]
    else:
        total = state["params"] + state["opt_state"] + temporaries
    mesh_shape = dict(layout.mesh.shape)
    sent, traffic = {}, {}
    for kind, axes in sorted({kind_axes for run in runs for kind_axes in run["sent"]}):
        group = math.prod(mesh_shape[axis] for axis in axes.split("+") if axis in mesh_shape)
        if group > 1:  # "-": a collective within one device sends nothing
            sent[f"{kind} over {axes}"] = at_n_layer([run["sent"].get((kind, axes), 0.0) for run in runs])
            traffic[f"{kind} over {axes}"] = sent[f"{kind} over {axes}"] * TRAFFIC[kind](group)
    return {"per_device_bytes": total, "parameter_bytes": state["params"], "optimizer_state_bytes": state["opt_state"],
            "temporary_bytes": temporaries, "collective_bytes": sent,
            "microbatches": microbatches, "flops": at_n_layer([run["flops"] for run in runs]) * microbatches,
            "traffic_bytes": sum(traffic.values()), "traffic": traffic,
            "compile_seconds": sum(run["seconds"] for run in runs), "compiled_layers": counts}


def step_seconds(figures: dict, device_flops: float, link_bandwidth: float) -> tuple[float, float]:
    """(compute seconds, communication seconds) of one step by the model in the module docstring."""
    return figures["flops"] / device_flops, figures["traffic_bytes"] / link_bandwidth


def search(config, devices, device_memory: int, *, choose_mesh: bool, seconds: float, device_flops: float,
           link_bandwidth: float, stand_in: bool, workers: int | None = None, out=None, progress=None):
    """Steps 1-4; prints the ranking and the `--set` line of the best, and returns the candidates
    ranked (fitting ones first, by step time). A ConfigError when nothing compiled fits."""
    start = time.perf_counter()
    out, progress = out or sys.stdout, progress or sys.stderr
    device_count = len(devices)
    if choose_mesh:
        mesh_shapes = meshes(device_count)
    else:
        mesh_shapes = [parse_mesh_shape(config.mesh_shape, config.source)]
        if not mesh_shapes[0]:
            raise ConfigError(f"{config.source}: --auto_layout searches layouts for the config's mesh_shape, which "
                              "is empty; use --auto_layout_and_mesh_shape to search meshes too, or set mesh_shape")
    shapes = _Shapes(config)
    candidates, refused = [], 0
    for mesh_shape in mesh_shapes:
        for layout, fsdp in layouts(config, mesh_shape):
            candidate = Candidate(mesh_shape, layout, fsdp)
            try:
                candidate.estimate = estimate(config, shapes, candidate)
            except ConfigError:
                refused += 1
                continue
            candidates.append(candidate)
    if not candidates:
        raise ConfigError(f"{config.source}: no layout of its dimensions splits evenly over {device_count} devices "
                          "(with train_batch_size and tokens_per_mb_per_replica as they are); change the batch size "
                          "or the device count")

    def estimated_seconds(candidate):
        return sum(step_seconds(candidate.estimate, device_flops, link_bandwidth))

    # those estimated to fit, fastest first, then those within the margin (the estimate is rough)
    promising = sorted((c for c in candidates if c.estimate["per_device_bytes"] <= ESTIMATE_MARGIN * device_memory),
                       key=lambda c: (c.estimate["per_device_bytes"] > device_memory, estimated_seconds(c)))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    if not promising:  # all look too big: compile the smallest few, to say by how much
        promising = sorted(candidates, key=lambda c: c.estimate["per_device_bytes"])[:workers]
    print(f"auto layout: {len(candidates)} layouts on {len(mesh_shapes)} mesh shape(s) of {device_count} devices "
          f"({refused} more refused by tokens_per_mb_per_replica); compiling, of the {len(promising)} estimated "
          f"within {ESTIMATE_MARGIN:g}x {device_memory / GIB:.2f} GiB, those estimated to fit first, fastest first, "
          f"for at most {seconds:.0f} s", file=progress, flush=True)
    compiled: list[Candidate] = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: dict = {}
        queue = iter(promising)
        while True:
            while len(pending) < workers and time.perf_counter() - start < seconds:
                candidate = next(queue, None)
                if candidate is None:
                    break
                pending[pool.submit(measure, config, candidate, devices, stand_in)] = candidate
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                candidate = pending.pop(future)
                try:
                    candidate.compiled = future.result()
                except ConfigError as err:
                    candidate.error = str(err)
                except Exception as err:  # noqa: BLE001 - a layout the compiler cannot partition is one bad candidate
                    candidate.error = f"the compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                compiled.append(candidate)
                print(_progress_line(candidate, len(compiled), len(promising), time.perf_counter() - start, seconds,
                                     device_memory, device_flops, link_bandwidth), file=progress, flush=True)
    measured = [c for c in compiled if c.compiled is not None]
    fitting = sorted((c for c in measured if c.compiled["per_device_bytes"] <= device_memory),
                     key=lambda c: sum(step_seconds(c.compiled, device_flops, link_bandwidth)))
    others = sorted((c for c in measured if c not in fitting), key=lambda c: c.compiled["per_device_bytes"])
    ranked = fitting + others
    elapsed = time.perf_counter() - start
    print(f"compiled {len(compiled)} of {len(promising)} in {elapsed:.0f} s; {len(fitting)} fit "
          f"{device_memory / GIB:.2f} GiB per device (model: FLOPs / {device_flops / 1e12:g} TFLOP/s + "
          f"collective traffic / {link_bandwidth / 1e9:g} GB/s)", file=out)
    print(f"{'rank':>4}  {'mesh_shape':<16} {'layout':<52} {'fsdp_axes':<9} {'GiB/device':>10} {'compute ms':>10} "
          f"{'comms ms':>9} {'step ms':>8}", file=out)
    for rank, candidate in enumerate(ranked[:8], 1):
        texts = candidate.texts
        compute, comms = step_seconds(candidate.compiled, device_flops, link_bandwidth)
        fits = "" if candidate in fitting else "  (does not fit)"
        print(f"{rank:>4}  {texts['mesh_shape'] or '-':<16} {texts['layout'] or '-':<52} {texts['fsdp_axes'] or '-':<9} "
              f"{candidate.compiled['per_device_bytes'] / GIB:10.2f} {_ms(compute):>10} {_ms(comms):>9} "
              f"{_ms(compute + comms):>8}{fits}", file=out)
    if not fitting:
        smallest = f"; the smallest compiled needs {others[0].compiled['per_device_bytes'] / GIB:.2f} GiB" if others else ""
        raise ConfigError(f"{config.source}: no layout compiled within {seconds:.0f} s fits {device_memory / GIB:.2f} "
                          f"GiB per device{smallest}: use more devices, recompute_grad, tokens_per_mb_per_replica, "
                          "a larger --device_memory or a longer --search_seconds")
    best = fitting[0]
    print("best:", file=out)
    print(",\n".join(f'"{key}": "{value}"' for key, value in best.texts.items()), file=out)
    print(f"use: {best.settings()}", file=out)
    return ranked


def _ms(seconds: float) -> str:
    """Milliseconds to one decimal, or to three figures when under 10 ms (a tiny model's step)."""
    milliseconds = seconds * 1e3
    return f"{milliseconds:.1f}" if milliseconds >= 10 else f"{milliseconds:.3g}"


def _progress_line(candidate, done: int, total: int, elapsed: float, budget: float, device_memory: int,
                   device_flops: float, link_bandwidth: float) -> str:
    width = 20
    filled = round(width * min(elapsed / budget, 1.0)) if budget > 0 else width
    texts = candidate.texts
    what = f"{texts['mesh_shape']} {texts['layout']}" + (f" fsdp_axes={texts['fsdp_axes']}" if candidate.fsdp_axes else "")
    if candidate.compiled is None:
        result = f"refused: {candidate.error}"
    else:
        figures = candidate.compiled
        fits = "fits" if figures["per_device_bytes"] <= device_memory else "too big"
        result = (f"{figures['per_device_bytes'] / GIB:.2f} GiB ({fits}), "
                  f"{_ms(sum(step_seconds(figures, device_flops, link_bandwidth)))} ms, "
                  f"compiled in {figures['compile_seconds']:.1f} s")
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:4.0f} s  {what}: {result}"
