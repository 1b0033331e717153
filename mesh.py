"""Named device meshes and layouts (design §3).

`mesh_shape: "x:4,y:2"` is a 4 x 2 `jax.sharding.Mesh` with axes x and y; `layout:
"batch:x,heads:y"` maps tensor dimension names to mesh axes. `MeshLayout.sharding` turns a
tuple of dimension names into a `NamedSharding`; parameters, optimizer state, batches and
activation constraints all go through it, so the rules Mesh-TensorFlow enforced hold everywhere:
a dimension must divide evenly by its mesh axis, and one tensor may not use a mesh axis twice.

`fsdp_axes: "x"` shards the weights further, not the activations: each weight's largest dimension
that its layout leaves whole and the FSDP axes divide is split over them too (`parameter_spec`),
and so are its gradient and optimizer state; the forward gathers each weight back to its layout
where it is used (`gather`), so every activation keeps the layout's placement.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from errors import ConfigError

log = logging.getLogger("neomesh")

# Every tensor dimension's name, and the letter that stands for it in einsum specs. Model code
# writes specs in these letters ("bse,ehk->bshk"); the output's sharding constraint is read from
# the same letters, so a spec and its constraint cannot disagree.
DIMENSION_LETTERS = {
    "batch": "b",
    "sequence": "s",  # query positions
    "memory_length": "m",  # key/value positions
    "embd": "e",
    "heads": "h",
    "kv": "k",
    "vocab": "v",
    "intermediate_expanded": "i",
    "experts": "x",  # a mixture-of-experts layer's (models/moe.py)
    "expert_hidden": "j",  # each expert's hidden width
    "groups": "o",  # a row's routing groups
    "group_tokens": "t",  # the positions of one group
    "expert_capacity": "z",  # an expert's slots per group
    "embed_sequence": "p",
    "axial_rows": "r",  # axial_pos_emb's first table
    "axial_columns": "c",  # and its second
    "mem_kv": "n",  # num_mem_kv's memory key/values
    "gau_key": "g",  # gau's q, k and v
    "gau_expanded": "u",  # gau's gate
    "lora_rank": "l",  # LoRA's factors (models/lora.py)
    "virtual_tokens": "w",  # prompt tuning's learned embeddings
    "prefix_hidden": "y",  # prefix tuning's reparametrisation MLP
}
DIMENSION_NAMES = tuple(DIMENSION_LETTERS)
POSITION_DIMENSIONS = ("sequence", "memory_length")  # a decoding step holds fewer positions than n_ctx
_LETTER_DIMENSIONS = {letter: name for name, letter in DIMENSION_LETTERS.items()}
DATA_AXIS = "data"  # the axis an empty mesh_shape puts every device of every process on

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"[0-9]{1,18}")  # ASCII digits (isdigit() takes "²", which int() refuses), fitting int64


def dimensions_of(letters: str) -> tuple[str, ...]:
    """"bshk" -> ("batch", "sequence", "heads", "kv")."""
    unknown = [letter for letter in letters if letter not in _LETTER_DIMENSIONS]
    if unknown:
        raise ValueError(f"einsum letters {letters!r}: {unknown[0]!r} names no dimension "
                         f"(letters: {', '.join(f'{c}={n}' for c, n in _LETTER_DIMENSIONS.items())})")
    return tuple(_LETTER_DIMENSIONS[letter] for letter in letters)


def _quoted(text: str) -> str:
    """A mesh_shape or layout (or a part of one) as a message quotes it: shortened when long."""
    return repr(text) if len(text) <= 100 else repr(text[:100]) + " ..."


def parse_mesh_shape(text: str, where: str = "config") -> dict[str, int]:
    """'x:4,y:2' -> {'x': 4, 'y': 2} (ordered)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition(":")
        name = name.strip()
        if not _NAME.match(name) or not _SIZE.fullmatch(size.strip()) or int(size) <= 0:
            raise ConfigError(
                f"{where}: key 'mesh_shape' = {_quoted(text)}: {_quoted(part)} is not name:size with a positive size; "
                'expected e.g. "x:4,y:2"'
            )
        if name in axes:
            raise ConfigError(f"{where}: key 'mesh_shape' = {_quoted(text)}: axis {_quoted(name)} appears twice")
        axes[name] = int(size)
    return axes


def parse_layout(text: str, mesh_axes: dict[str, int], where: str = "config") -> dict[str, str]:
    """'batch:x,heads:y' -> {'batch': 'x', 'heads': 'y'}, checked against the dimension names and mesh axes."""
    layout: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dim, _, axis = (s.strip() for s in part.partition(":"))
        if not dim or not axis:
            raise ConfigError(f"{where}: key 'layout' = {_quoted(text)}: {_quoted(part)} is not dimension:axis, e.g. \"batch:x\"")
        if dim not in DIMENSION_NAMES:
            raise ConfigError(
                f"{where}: key 'layout' = {_quoted(text)}: unknown dimension {_quoted(dim)}; accepted: {', '.join(DIMENSION_NAMES)}"
            )
        if axis not in mesh_axes:
            known = ", ".join(mesh_axes) or "none: mesh_shape is empty"
            raise ConfigError(
                f"{where}: key 'layout' = {_quoted(text)}: dimension {_quoted(dim)} maps to mesh axis {_quoted(axis)}, "
                f"which mesh_shape does not define (axes: {known})"
            )
        if dim in layout:
            raise ConfigError(f"{where}: key 'layout' = {_quoted(text)}: dimension {_quoted(dim)} appears twice")
        layout[dim] = axis
    return layout


def parse_fsdp_axes(text: str, mesh_axes: dict[str, int], where: str = "config") -> tuple[str, ...]:
    """'x,y' -> ('x', 'y'): mesh axes to shard weights over (fully sharded data parallel)."""
    axes: list[str] = []
    for axis in filter(None, (a.strip() for a in text.split(","))):
        if axis not in mesh_axes:
            known = ", ".join(mesh_axes) or "none: mesh_shape is empty"
            raise ConfigError(f"{where}: key 'fsdp_axes' = {_quoted(text)}: {_quoted(axis)} is not an axis of "
                              f"mesh_shape (axes: {known}); expected a comma list of them, e.g. \"x\", or empty")
        if axis in axes:
            raise ConfigError(f"{where}: key 'fsdp_axes' = {_quoted(text)}: axis {_quoted(axis)} appears twice")
        axes.append(axis)
    return tuple(axes)


def suggest_mesh_shape(axes: dict[str, int], device_count: int) -> str:
    """Keep the axis names; put every device on the first axis."""
    names = list(axes) or ["x"]
    return ",".join(f"{name}:{device_count if i == 0 else 1}" for i, name in enumerate(names))


def suggest_mesh_for_batch(config, device_count: int) -> str:
    """What to set when a train batch does not spread over every device: a batch size that does,
    or a mesh that splits the model instead of the batch (over a dimension the device count divides)."""
    larger = -(-config.train_batch_size // device_count) * device_count
    advice = f"set train_batch_size to a multiple of {device_count} (e.g. --set train_batch_size={larger})"
    sizes = config.dim_sizes
    for dim in ("heads", "intermediate_expanded", "vocab", "embd"):
        if sizes[dim] % device_count == 0:
            return advice + f", or split the model instead: --set mesh_shape=x:{device_count} --set layout={dim}:x"
    return advice + ", or give mesh_shape and layout yourself"


def einsum(spec: str, *operands, layout: MeshLayout | None = None) -> jax.Array:
    """`jnp.einsum` in dimension letters, its output constrained to the layout by the same letters."""
    out = jnp.einsum(spec, *operands)
    return out if layout is None else layout.constrain_letters(out, spec.split("->")[1])


class MeshLayout:
    """A device mesh with a layout: the one place that decides how every tensor is placed."""

    def __init__(self, mesh: Mesh, layout: dict[str, str], fsdp_axes: Sequence[str] = ()):
        self.mesh = mesh
        self.layout = layout
        self.fsdp_axes = tuple(fsdp_axes)

    def with_layout(self, layout: dict[str, str]) -> MeshLayout:
        """The same mesh and FSDP axes with another layout (one without `batch`, say)."""
        return MeshLayout(self.mesh, layout, self.fsdp_axes)

    @property
    def batch_axis_size(self) -> int:
        axis = self.layout.get("batch")
        return self.mesh.shape[axis] if axis else 1

    def spec(self, dims: Sequence[str | None], shape: Sequence[int] | None = None, name: str = "tensor") -> PartitionSpec:
        axes: list[str | None] = []
        for i, dim in enumerate(dims):
            axis = self.layout.get(dim) if dim else None
            if axis is not None and axis in axes:
                other = dims[axes.index(axis)]
                raise ConfigError(
                    f"layout: tensor {name!r} {tuple(dims)} maps both {other!r} and {dim!r} to mesh axis {axis!r}; "
                    "a tensor may use each mesh axis once"
                )
            if axis is not None and shape is not None and shape[i] % self.mesh.shape[axis]:
                raise ConfigError(
                    f"layout: tensor {name!r} dimension {dim!r} has size {shape[i]}, which does not divide evenly "
                    f"by mesh axis {axis!r} of size {self.mesh.shape[axis]}"
                )
            axes.append(axis)
        return PartitionSpec(*axes)

    def sharding(self, dims: Sequence[str | None], shape: Sequence[int] | None = None, name: str = "tensor") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(dims, shape, name))

    def parameter_spec(self, dims: Sequence[str], shape: Sequence[int], name: str = "weight") -> PartitionSpec:
        """A weight's placement: its layout's (`spec`), and with fsdp_axes its largest dimension
        that the layout leaves whole and the FSDP axes' size divides split over those axes too
        (the first such when several are as large; over the FSDP axes the layout does not already
        give this weight). A weight none of whose dimensions divide stays whole on them."""
        axes = list(self.spec(dims, shape, name))
        fsdp = [axis for axis in self.fsdp_axes if axis not in axes]
        size = math.prod(self.mesh.shape[axis] for axis in fsdp)
        whole = [i for i, axis in enumerate(axes) if axis is None and shape[i] % size == 0]
        if fsdp and size > 1 and whole:
            largest = max(whole, key=lambda i: shape[i])
            axes[largest] = fsdp[0] if len(fsdp) == 1 else tuple(fsdp)
        elif fsdp and size > 1:
            log.debug("fsdp_axes: no dimension of %s %s %s divides by %d: it stays whole on %s",
                      name, tuple(dims), tuple(shape), size, fsdp)
        return PartitionSpec(*axes)

    def parameter_sharding(self, dims: Sequence[str], shape: Sequence[int], name: str = "weight") -> NamedSharding:
        return NamedSharding(self.mesh, self.parameter_spec(dims, shape, name))

    def gather(self, weight: jax.Array, dims: Sequence[str]) -> jax.Array:
        """A weight, inside a jit-compiled function, placed by its layout alone: with fsdp_axes an
        all-gather over them where the weight is used (and in the backward its gradient reduced
        back to the shards)."""
        return self.constrain(weight, dims) if self.fsdp_axes else weight

    def constrain(self, x: jax.Array, dims: Sequence[str | None]) -> jax.Array:
        """Pin an activation's sharding inside a jit-compiled function. A dimension shorter than
        the config's (one new position while decoding, along `sequence` or `memory_length`) stays
        whole where its mesh axis does not divide it; the full sizes are checked once, by
        `check_dimensions`."""
        if self.mesh.size == 1:
            return x
        whole = [None if dim in POSITION_DIMENSIONS and dim in self.layout and size % self.mesh.shape[self.layout[dim]]
                 else dim for dim, size in zip(dims, x.shape)]
        return jax.lax.with_sharding_constraint(x, self.sharding(whole, x.shape, name="activation"))

    def check_dimensions(self, config) -> None:
        """`sequence` and `memory_length`, at the config's sizes, divide evenly by their mesh axes
        (every other dimension is checked on the tensors that have it)."""
        for dim in POSITION_DIMENSIONS:
            axis, size = self.layout.get(dim), config.dim_sizes[dim]
            if axis is not None and size % self.mesh.shape[axis]:
                raise ConfigError(
                    f"{config.source}: key 'layout' = {config.layout!r}: dimension {dim!r} has size {size}, which "
                    f"does not divide evenly by mesh axis {axis!r} of size {self.mesh.shape[axis]}"
                )

    def constrain_letters(self, x: jax.Array, letters: str) -> jax.Array:
        """`constrain` with the dimensions named by einsum letters, e.g. "bshk"."""
        return self.constrain(x, dimensions_of(letters))

    def for_batch(self, batch_size: int) -> MeshLayout:
        """This layout for a batch of `batch_size` rows: the same, or, where its batch axis does not
        divide them (an eval batch smaller than the data-parallel mesh), with the batch whole on
        every device: evaluating unsplit costs speed, not correctness."""
        axis = self.layout.get("batch")
        if axis is None or batch_size % self.mesh.shape[axis] == 0:
            return self
        log.info("a batch of %d rows does not divide over mesh axis %r of size %d: it runs unsplit",
                 batch_size, axis, self.mesh.shape[axis])
        return self.with_layout({dim: a for dim, a in self.layout.items() if dim != "batch"})

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def build_mesh_layout(config, devices: Sequence[jax.Device] | None = None) -> MeshLayout:
    """mesh_shape and layout of a config -> MeshLayout over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    axes = parse_mesh_shape(config.mesh_shape, config.source)
    layout = parse_layout(config.layout, axes, config.source)
    if not axes:
        # every device of every process, data parallel; an eval or predict batch that does not
        # divide them runs unsplit (MeshLayout.for_batch), so only the train batch decides
        if config.train_batch_size % len(devices):
            raise ConfigError(
                f"{config.source}: key 'mesh_shape' is empty, which means data parallel over all {len(devices)} "
                f"devices, but train_batch_size {config.train_batch_size} does not divide evenly by {len(devices)}; "
                f"{suggest_mesh_for_batch(config, len(devices))}"
            )
        axes, layout = {DATA_AXIS: len(devices)}, ({"batch": DATA_AXIS} if len(devices) > 1 else {})
        log.info("mesh_shape is empty: data parallel over all %d devices (batch:%s)", len(devices), DATA_AXIS)
    size = math.prod(axes.values())
    if size != len(devices):
        raise ConfigError(
            f"{config.source}: key 'mesh_shape' = {config.mesh_shape!r} needs {size} devices but {len(devices)} "
            f"are available; try --set mesh_shape={suggest_mesh_shape(axes, len(devices))}"
        )
    device_grid = np.asarray(devices, dtype=object).reshape(tuple(axes.values()))
    try:  # a physical-topology-aware order where JAX knows one (TPU, multi-host GPU)
        from jax.experimental import mesh_utils

        device_grid = mesh_utils.create_device_mesh(tuple(axes.values()), devices=devices)
    except Exception:  # noqa: BLE001 - any failure leaves the plain order, which is always valid
        pass
    fsdp_axes = parse_fsdp_axes(config.fsdp_axes, axes, config.source)
    mesh_layout = MeshLayout(Mesh(device_grid, tuple(axes)), layout, fsdp_axes)
    mesh_layout.check_dimensions(config)
    return mesh_layout


def device_memory_bytes(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """(bytes, what they are) one of these devices can hold: its bytes_limit, or on a CPU, which
    reports none, the host's memory shared by the devices."""
    import os

    devices = list(devices)
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit is not None:
        return int(limit), f"a {devices[0].platform} device's memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // len(devices), "this host's memory per CPU device"


def compiled_total_bytes(memory) -> int:
    """A compiled step's per-device bytes from its memory_analysis(): arguments, outputs and
    temporaries, less what is donated (aliased)."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)


def refuse_beyond(needed: int, limit: int, what: str, where: str) -> None:
    """A ConfigError naming both figures when a train step needs more than a device holds, so that
    a model too large for its mesh is refused before any of it is allocated."""
    if needed > limit:
        gib = 2**30
        raise ConfigError(f"{where}: the train step needs {needed / gib:.2f} GiB per device, beyond {what} "
                          f"({limit / gib:.2f} GiB): shard it over more devices (mesh_shape, layout), use "
                          "tokens_per_mb_per_replica or recompute_grad, or make the model smaller")


def check_fits_in_memory(compiled, layout: MeshLayout, where: str) -> int:
    """The per-device bytes of a compiled step (`compiled_total_bytes`), refused (`refuse_beyond`)
    when they exceed what one of the layout's devices holds."""
    memory = compiled.memory_analysis()
    if memory is None:  # a backend that does not say: nothing to check against
        return 0
    total = compiled_total_bytes(memory)
    refuse_beyond(total, *device_memory_bytes(layout.mesh.devices.flat), where)
    return total
