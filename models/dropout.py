"""Dropout: zero each element with probability `rate`, scale the kept ones by 1 / (1 - rate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(rng, x, rate: float):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
