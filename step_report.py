"""What a compiled step holds and sends, for `main.py --dry_run` and bench/scale_table.py.

- `sharded_bytes`: a tree's bytes on one device, from its shardings (exact, whatever the compiler).
- `collectives`: the collectives of a compiled step's HLO text, by kind and mesh axis, with the
  bytes each moves per step (a collective inside a loop counts once per trip).
- `accelerator_estimate`: per-device bytes on a bf16, rematerialising accelerator, for when
  XLA:CPU stands in for one (it neither rematerialises nor keeps bf16 dots in bf16); the formula
  is in README.md's dry-run section.
- `parse_memory`: "16GiB" -> bytes, for --device_memory.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np

from errors import ConfigError

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVE_KINDS) + r")(-start)?\(")
_CALLS = re.compile(r"\b(body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"')
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[0-9,\s]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+|\([^=]*?\))\s+[\w\-]+\(", re.M)
_OPERAND = re.compile(r"%([\w.\-]+)")
# XLA's newer spelling: the devices as a mesh of its own axes (in iota order, or permuted by
# device_ids), and the axes a group spans: mesh['axis_0'=4,'axis_1'=2] device_ids=(...) {'axis_0'}
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                          r"\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,\s]*\},?\s*)*)\}")


def parse_memory(text: str, where: str = "--device_memory") -> int:
    """'16GiB' / '80 GB' / '512MiB' / a plain byte count -> bytes; anything else a ConfigError."""
    match = _MEMORY.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{where} {text!r}: expected a positive size with a unit, e.g. 16GiB, 80GB or 512MiB "
                          "(units: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return int(float(match.group(1)) * _UNITS[unit])


def sharded_bytes(shapes, shardings) -> int:
    """The bytes of a tree of arrays (ShapeDtypeStructs) that one device holds under `shardings` (a
    matching tree of NamedShardings): each leaf's shard shape, not the whole array over a divisor."""
    import jax

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def shape_bytes(text: str) -> int:
    """The bytes of every array shape written in an HLO fragment ('(f32[4,8]{1,0}, bf16[2])')."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _SHAPE.findall(text))


def _groups(line: str, device_count: int) -> list[list[int]]:
    """The device groups a collective works within (logical ids: positions in the mesh's device order)."""
    if match := _PAIRS.search(line):
        return [[int(i) for i in pair.split(",")] for pair in re.findall(r"\{([0-9,\s]*)\}", match.group(1))]
    if match := _MESH_GROUPS.search(line):
        names = re.findall(r"'([^']+)'=([0-9]+)", match.group(1))
        sizes = [int(size) for _, size in names]
        ids = np.arange(math.prod(sizes))
        if match.group(2):
            ids = ids.reshape([int(n) for n in match.group(2).split(",")])
            if match.group(3):
                ids = ids.transpose([int(n) for n in match.group(3).split(",")])
        ids = ids.reshape(sizes)
        spanned = [i for i, (name, _) in enumerate(names) if f"'{name}'" in match.group(4)]
        kept = [i for i in range(len(names)) if i not in spanned]
        group_size = math.prod(sizes[i] for i in spanned)
        return ids.transpose(kept + spanned).reshape(-1, group_size).tolist()
    if match := _IOTA_GROUPS.search(line):
        shape = [int(n) for n in match.group(1).split(",")]
        dims = [int(n) for n in match.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if match.group(3):
            ids = ids.transpose([int(n) for n in match.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if match := _LIST_GROUPS.search(line):
        groups = [[int(i) for i in g.split(",") if i.strip()] for g in re.findall(r"\{([0-9,\s]*)\}", match.group(1))]
        if groups and all(groups):
            return groups
    return [list(range(device_count))]  # replica_groups={}: every device


def _axes_of(groups: list[list[int]], mesh_shape: dict[str, int]) -> str:
    """The mesh axes along which a collective's groups extend: 'x', 'x+y', or '-' (no other device)."""
    sizes = tuple(mesh_shape.values())
    varying = set()
    for group in groups:
        coordinates = np.array(np.unravel_index(np.array(group), sizes)).T
        varying |= {axis for axis, column in zip(mesh_shape, coordinates.T) if len(set(column.tolist())) > 1}
    return "+".join(axis for axis in mesh_shape if axis in varying) or "-"


def _computation_trips(hlo: str) -> dict[str, int]:
    """How many times each computation of an HLO module runs per call of the entry computation:
    a while loop's body as often as its known trip count (1 where XLA does not know it)."""
    callees: dict[str, list[tuple[str, int]]] = defaultdict(list)
    entry, current = None, None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line.strip()):
            current = match.group(1)
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        trip_count = _TRIP_COUNT.search(line)
        for key, name in _CALLS.findall(line):
            callees[current].append((name, int(trip_count.group(1)) if key == "body" and trip_count else 1))
        if match := _BRANCHES.search(line):
            callees[current] += [(name.strip().lstrip("%"), 1) for name in match.group(1).split(",")]
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        runs[name] += times
        if depth < 64:
            for callee, trips in callees.get(name, ()):
                visit(callee, times * trips, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def collectives(hlo: str, mesh_shape: dict[str, int]) -> dict[tuple[str, str], dict]:
    """{(kind, mesh axes): {"count": ops run per step, "bytes": bytes per step}} of a compiled step.
    An op's bytes are the larger of its operands and its result on one device (an all-gather's
    gathered result, a reduce-scatter's unscattered input); ops in a loop count once per trip."""
    device_count = math.prod(mesh_shape.values()) or 1
    runs = _computation_trips(hlo)
    result_bytes = {match.group(1): shape_bytes(match.group(2)) for match in _INSTRUCTION.finditer(hlo)}
    found: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "bytes": 0})
    axes_of: dict[str, str] = {}
    current = None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line.strip()):
            current = match.group(1)
            continue
        match = _OP.search(line)
        if match is None:
            continue
        kind = match.group(2)
        operands = line[match.end():].split(")", 1)[0]
        operand_bytes = shape_bytes(operands) or sum(result_bytes.get(name, 0) for name in _OPERAND.findall(operands))
        size = max(operand_bytes, shape_bytes(match.group(1)))
        if match.group(3):  # an async start's result holds its operands and its result
            size = max(operand_bytes, shape_bytes(match.group(1)) - operand_bytes)
        times = runs.get(current, 1) if runs else 1
        groups_text = next((m.group(0) for pattern in (_PAIRS, _MESH_GROUPS, _IOTA_GROUPS, _LIST_GROUPS)
                            if (m := pattern.search(line))), "")
        if groups_text not in axes_of:  # thousands of ops share a few groupings
            axes_of[groups_text] = _axes_of(_groups(groups_text, device_count), mesh_shape)
        entry = found[(kind, axes_of[groups_text])]
        entry["count"] += times
        entry["bytes"] += times * size
    return dict(found)


def accelerator_estimate(config, layout, microbatches: int, state_bytes: dict, compiled_temporaries: int | None = None) -> dict:
    """Per-device bytes of the train step on an accelerator that keeps bf16 activations in bf16 and
    rematerialises each block when recompute_grad is on (README.md, dry-run section):

        state (parameters + optimizer state, exact)
        + min(the compiled step's temporaries,
              gradients (the parameters' bytes)
              + saved activations: recompute_grad: one residual stream per layer (b s e a),
                otherwise every layer's activations (layer_activations below, n_layer times)
              + one layer's activations (recomputed, or the last layer's)
              + the logits and their gradient (2 b s v 4, float32))

    with b, s, e, i, h, m, v the microbatch's rows, positions, width, MLP width, heads, key positions
    and vocab on one device (each divided by its mesh axis per the layout), a = 2 bytes in bfloat16
    else 4, and layer_activations = a b s (8 e + 2 i) + 2 x 4 b h s m (attention scores and
    probabilities, float32). The compiled plan bounds it: an accelerator need not do worse than it."""
    sizes = config.dim_sizes

    def local(dim: str, size: int | None = None) -> int:
        axis = layout.layout.get(dim)
        size = sizes[dim] if size is None else size
        return max(size // (layout.mesh.shape[axis] if axis else 1), 1)

    act = 2 if config.precision == "bfloat16" else 4
    rows = local("batch", config.train_batch_size // microbatches)
    s, e, m = local("sequence"), local("embd"), local("memory_length")
    i, h, v = local("intermediate_expanded"), local("heads"), local("vocab")
    residual = rows * s * e * act
    layer_activations = act * rows * s * (8 * e + 2 * i) + 2 * 4 * rows * h * s * m
    saved = config.n_layer * (residual if config.recompute_grad else layer_activations)
    logits = 2 * rows * s * v * 4
    gradients = state_bytes["params"]
    activations = saved + layer_activations + logits
    if compiled_temporaries is not None and compiled_temporaries < gradients + activations:
        activations = max(compiled_temporaries - gradients, 0)
    total = state_bytes["params"] + state_bytes["opt_state"] + gradients + activations
    return {"gradients": gradients, "activations": activations, "total": total}
