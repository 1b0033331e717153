"""Normalisation of the residual stream, computed in float32 whatever the compute dtype.

    layer_norm   LayerNorm over `embd`: a gain and a bias per embd, epsilon layer_norm_epsilon
    scale_norm   scalenorm, GPT-Neo's form: (x - mean) / sqrt(var + 1e-5) times one learned
                 scalar gain (init 1), no bias; a mean-centred norm with a scalar gain, not the
                 paper's g * x / |x|

A block's pre-norms (`prenorm`) are one or the other by `scalenorm`; ln_f is always a LayerNorm.

rezero (ReZero) replaces the pre-norms by the identity and multiplies each residual branch (a
block's attention, its MLP) by its own learned scalar, `rezero_gain`, which starts at 0: a fresh
ReZero model leaves the residual stream as the embedding made it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.params import Weight

SCALENORM_EPSILON = 1e-5  # GPT-Neo's, fixed: layer_norm_epsilon is the LayerNorms'


def layer_norm_weights(config) -> dict[str, Weight]:
    return {"scale": Weight(("embd",), "ones", decay=False), "bias": Weight(("embd",), "zeros", decay=False)}


def _normalised(x32, epsilon):
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + epsilon)


def layer_norm(p, x, config):
    """Normalise over `embd` in float32 whatever the compute dtype."""
    y = _normalised(x.astype(jnp.float32), config.layer_norm_epsilon)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def scale_norm(p, x):
    y = _normalised(x.astype(jnp.float32), SCALENORM_EPSILON)
    return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def prenorm_weights(config) -> dict[str, Weight] | None:
    """None: no weights, the norm is the identity (rezero)."""
    if config.rezero:
        return None
    if config.scalenorm:
        return {"scale": Weight((), "ones", decay=False)}
    return layer_norm_weights(config)


def prenorm(p, x, config):
    """The norm in front of a block's attention or MLP."""
    if config.rezero:
        return x
    return scale_norm(p, x) if config.scalenorm else layer_norm(p, x, config)


def rezero_gain() -> Weight:
    return Weight((), "zeros", decay=False)
