"""The parts of a GPT-Neo block: LayerNorm, attention (global / local / none), MLP.

Each part has a `*_weights(config)` that names every parameter's dimensions next to its init,
and a function that applies it. Shapes are never written by hand: they come from the dimension
names and `config.dim_sizes`, so a weight cannot disagree with its sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from models.activations import ACTIVATIONS

MASK_VALUE = -1e9  # finite, so a fully masked row (never built here) could not produce NaN


@dataclass(frozen=True)
class Weight:
    """A parameter: its dimension names and how to initialise it."""

    dims: tuple[str, ...]
    init: str | float  # "zeros", "ones", or the standard deviation of a normal


def projection_std(config, fan_in: int, residual_output: bool = False) -> float:
    std = 0.02
    if residual_output and config.scale_by_depth:
        std /= math.sqrt(config.n_layer)
    if config.scale_by_in:
        std /= math.sqrt(fan_in)
    return std


# --- LayerNorm ------------------------------------------------------------------------------


def layer_norm_weights() -> dict[str, Weight]:
    return {"scale": Weight(("embd",), "ones"), "bias": Weight(("embd",), "zeros")}


def layer_norm(p, x, epsilon: float):
    """Normalise over `embd` in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


# --- attention ------------------------------------------------------------------------------


def attention_weights(config) -> dict[str, Weight]:
    std = projection_std(config, config.n_embd)
    return {
        "q": Weight(("embd", "heads", "kv"), std),
        "k": Weight(("embd", "heads", "kv"), std),
        "v": Weight(("embd", "heads", "kv"), std),
        "out": Weight(("heads", "kv", "embd"), projection_std(config, config.n_embd, residual_output=True)),
        "out_bias": Weight(("embd",), "zeros"),
    }


def project_qkv(p, x):
    """x [batch, sequence, embd] -> q, k, v, each [batch, sequence, heads, kv]."""
    q = jnp.einsum("bse,ehk->bshk", x, p["q"])
    k = jnp.einsum("bse,ehk->bshk", x, p["k"])
    v = jnp.einsum("bse,ehk->bshk", x, p["v"])
    return q, k, v


def attention_mask(query_positions, key_positions, kind: str, radius: int):
    """[sequence, memory_length] booleans: causal, and for `local` within the last `radius` positions
    (query i sees key j when 0 <= i - j < radius, Hugging Face GPTNeo's window_size)."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if kind == "local":
        allowed &= distance < radius
    return allowed


def attend(q, k, v, mask, dropout_rng=None, dropout_rate: float = 0.0):
    """Softmax attention without 1/sqrt(kv) scaling (GPT-Neo and HF GPTNeo do not scale).

    q [batch, sequence, heads, kv], k and v [batch, memory_length, heads, kv],
    mask broadcastable to [batch, heads, sequence, memory_length] -> [batch, sequence, heads, kv].
    """
    scores = jnp.einsum("bqhk,bmhk->bhqm", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout_rng is not None and dropout_rate > 0:
        probs = dropout(dropout_rng, probs, dropout_rate)
    return jnp.einsum("bhqm,bmhk->bqhk", probs, v)


def project_out(p, attended):
    """[batch, sequence, heads, kv] -> [batch, sequence, embd]."""
    return jnp.einsum("bqhk,hke->bqe", attended, p["out"]) + p["out_bias"]


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting the queries so that causal attention skips most of the
    keys no query can see: blocks of at least 128 queries, at most 8 of them (more blocks save
    little and cost compile time)."""
    count = min(8, -(-length // 128))
    size = -(-length // count)
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def attention(p, x, kind: str, config, layout, dropout_rng=None):
    q, k, v = project_qkv(p, x)
    if layout is not None:
        q, k, v = (layout.constrain(t, ("batch", "sequence", "heads", "kv")) for t in (q, k, v))
    radius = config.local_attention_radius
    attention_dropout = dropout_rng is not None and config.attn_dropout > 0
    if fused_attention_applies(q, layout) and not attention_dropout:
        return project_out(p, fused_attention(q, k, v, kind, radius))
    positions = jnp.arange(x.shape[1])
    attended = []
    for index, (start, stop) in enumerate(query_blocks(x.shape[1])):
        first_key = max(0, start - radius + 1) if kind == "local" else 0  # keys after stop are in the future
        mask = attention_mask(positions[start:stop], positions[first_key:stop], kind, radius)
        block_rng = jax.random.fold_in(dropout_rng, index) if dropout_rng is not None else None
        attended.append(attend(q[:, start:stop], k[:, first_key:stop], v[:, first_key:stop], mask,
                               block_rng, config.attn_dropout))
    return project_out(p, jnp.concatenate(attended, axis=1))


def fused_attention_applies(q, layout) -> bool:
    """cuDNN's fused attention takes half-precision q/k/v on a GPU, a head size that is a multiple
    of 8 up to 128, and (to train) an even sequence length; the sequence and kv dimensions must be
    whole on each device. It has no attention dropout: a step that uses one takes the blocked path."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if q.shape[-1] % 8 or q.shape[-1] > 128 or q.shape[1] % 2:
        return False
    return layout is None or not any(layout.layout.get(dim) for dim in ("sequence", "kv"))


def fused_attention(q, k, v, kind: str, radius: int):
    """Causal attention in one cuDNN kernel (no score matrix in memory), unscaled as GPT-Neo's:
    softmax in float32 inside the kernel. A `local` query sees itself and radius-1 keys before."""
    window = (radius - 1, 0) if kind == "local" else None
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, local_window_size=window,
                                        implementation="cudnn")


# --- MLP ------------------------------------------------------------------------------------


def mlp_weights(config) -> dict[str, Weight]:
    return {
        "fc": Weight(("embd", "intermediate_expanded"), projection_std(config, config.n_embd)),
        "fc_bias": Weight(("intermediate_expanded",), "zeros"),
        "proj": Weight(("intermediate_expanded", "embd"), projection_std(config, config.mlp_width, residual_output=True)),
        "proj_bias": Weight(("embd",), "zeros"),
    }


def mlp(p, x, config, layout):
    h = jnp.einsum("bse,ei->bsi", x, p["fc"]) + p["fc_bias"]
    if layout is not None:
        h = layout.constrain(h, ("batch", "sequence", "intermediate_expanded"))
    h = ACTIVATIONS[config.activation_function](h)
    return jnp.einsum("bsi,ie->bse", h, p["proj"]) + p["proj_bias"]


# --- the residual stream's gradient ---------------------------------------------------------


@jax.custom_vjp
def materialise_gradient(x):
    """The identity; in the backward pass the compiler must compute x's gradient once, here.

    XLA's CPU fusion copies cheap elementwise producers into every consumer. The residual
    stream's gradient is a chain of elementwise adds through all layers, so without a boundary
    every layer's weight-gradient fusion recomputes it from the top: quadratic in n_layer, a
    third of a 12-layer step. A conditional is a fusion boundary. Both branches are the
    identity, written differently so that the compiler keeps them apart, and the predicate
    depends on the data so that it cannot be folded away. Only XLA's CPU fusion needs this;
    elsewhere a conditional would cost a host sync, so other backends pass the gradient on.
    """
    return x


def _materialise_forward(x):
    return x, None


def _materialise_backward(_, gradient):
    if jax.default_backend() != "cpu":
        return (gradient,)
    first = gradient.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda g: g, lambda g: g + 0, gradient),)


materialise_gradient.defvjp(_materialise_forward, _materialise_backward)


# --- dropout --------------------------------------------------------------------------------


def dropout(rng, x, rate: float):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
