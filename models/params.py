"""Parameters: each weight is a `Weight` naming its dimensions, its init and whether weight decay
applies to it. A model's `weights(config)` is a tree of them; everything else about a parameter
(its shape, its sharding, its optimizer treatment) is derived from that one description.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Weight:
    """A parameter: its dimension names, how to initialise it, whether weight decay applies, and
    whether it is a fine-tuning adapter (models/lora.py: then only adapters train)."""

    dims: tuple[str, ...]
    init: str | float  # "zeros", "ones", or the standard deviation of a normal
    decay: bool = True
    truncated: bool = False  # the normal is cut at two standard deviations (mesh-tensorflow's experts)
    adapter: bool = False


def bias(dims: tuple[str, ...]) -> Weight:
    """Biases start at zero and are not decayed (GPT-Neo's rule)."""
    return Weight(dims, "zeros", decay=False)


def projection_std(config, fan_in: int, residual_output: bool = False) -> float:
    """GPT-Neo's init for a projection: 0.02, divided by sqrt(n_layer) for the projections that
    write into the residual stream (scale_by_depth) and by sqrt(fan_in) (scale_by_in)."""
    std = 0.02
    if residual_output and config.scale_by_depth:
        std /= math.sqrt(config.n_layer)
    if config.scale_by_in:
        std /= math.sqrt(fan_in)
    return std


def is_weight(node) -> bool:
    return isinstance(node, Weight)


def shape_of(weight: Weight, config) -> tuple[int, ...]:
    sizes = config.dim_sizes
    return tuple(sizes[dim] for dim in weight.dims)


def decay_mask(weights) -> dict:
    """The tree of booleans the optimizer's weight decay reads: True where a weight decays."""
    return jax.tree.map(lambda weight: weight.decay, weights, is_leaf=is_weight)


def initialise(weights, config, rng: jax.Array, shardings=None):
    """Random float32 values for a tree of Weights; with `shardings` (a tree like it) each device
    makes only its own shard. The values do not depend on the shardings."""
    leaves, treedef = jax.tree.flatten(weights, is_leaf=is_weight)
    keys = jax.random.split(rng, len(leaves))
    placements = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    return treedef.unflatten([
        _initial_weight(key, shape_of(weight, config), weight.init, weight.truncated, placement)
        for weight, key, placement in zip(leaves, keys, placements)
    ])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _initial_weight(key, shape: tuple, init, truncated: bool, sharding):
    """One weight. A program per (shape, init, sharding), reused by every layer: one program for
    the whole tree took a GPU two minutes to compile (a kernel per weight), this takes seconds."""
    if init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif truncated:
        value = init * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    else:
        value = init * jax.random.normal(key, shape, jnp.float32)
    return value if sharding is None else jax.lax.with_sharding_constraint(value, sharding)
