"""Normalisation of the residual stream: LayerNorm over `embd`, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.params import Weight


def layer_norm_weights(config) -> dict[str, Weight]:
    return {"scale": Weight(("embd",), "ones", decay=False), "bias": Weight(("embd",), "zeros", decay=False)}


def layer_norm(p, x, config):
    """Normalise over `embd` in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + config.layer_norm_epsilon)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
