"""The parts of a GPT-Neo block: LayerNorm, attention (global / local / none), MLP.

Each part has a `*_weights(config)` that names every parameter's dimensions next to its init,
and a function that applies it. Shapes are never written by hand: they come from the dimension
names and `config.dim_sizes`, so a weight cannot disagree with its sharding.
"""

from __future__ import annotations

import functools
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


# --- projections ----------------------------------------------------------------------------


def project(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` for a projection "<rows><in>,<in><out>-><rows><out>": x's trailing
    dimensions contract with w's leading ones, e.g. "bse,ehk->bshk"."""
    operands, output = spec.split("->")
    x_letters, w_letters = operands.split(",")
    contracted = len([letter for letter in x_letters if letter in w_letters and letter not in output])
    if not contracted or x_letters[-contracted:] != w_letters[:contracted] or \
            output != x_letters[:-contracted] + w_letters[contracted:]:
        raise ValueError(f"project: {spec!r} is not of the form '<rows><in>,<in><out>-><rows><out>'")
    if jax.default_backend() != "cpu":
        return jnp.einsum(spec, x, w)
    return _cpu_projection(x, w, contracted)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_projection(x, w, contracted: int):
    """x @ w over `contracted` dimensions, with a backward written for XLA's CPU backend.

    Its matmul kernels are fastest when both operands are row-major with the contraction between
    them ([rows, in] @ [in, out]). The derived backward's products x^T @ g and g @ w^T are not:
    XLA either runs a slower kernel on them or transposes an activation inside a fusion that also
    recomputes its producer (one such 25 MB transpose took 112 ms). Here each product gets its
    operands transposed once, behind an optimization barrier so that XLA keeps the plain copy; and
    the weight gradient transposes whichever side is smaller: x, or g and the weight-sized result.
    """
    return jnp.tensordot(x, w, contracted)


def _cpu_projection_forward(x, w, contracted):
    return _cpu_projection(x, w, contracted), (x, w)


def _cpu_projection_backward(contracted, residuals, g):
    x, w = residuals
    row_dims, out_dims = x.ndim - contracted, w.ndim - contracted
    d_x = jnp.tensordot(g, _leading_swapped(w, contracted), out_dims)
    rows, out_size = math.prod(x.shape[:row_dims]), math.prod(w.shape[contracted:])
    in_size = w.size // out_size
    if rows * in_size <= rows * out_size + w.size:
        d_w = jnp.tensordot(_leading_swapped(x, row_dims), g, row_dims)
    else:
        d_w = _leading_swapped(jnp.tensordot(_leading_swapped(g, row_dims), x, row_dims), out_dims)
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


def _leading_swapped(a, leading: int):
    """`a` with its first `leading` dimensions moved to the end, materialised as such: behind an
    optimization barrier XLA may not fold the transpose back into the matmul that consumes it."""
    return jax.lax.optimization_barrier(jnp.transpose(a, (*range(leading, a.ndim), *range(leading))))


_cpu_projection.defvjp(_cpu_projection_forward, _cpu_projection_backward)


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
    q = project("bse,ehk->bshk", x, p["q"])
    k = project("bse,ehk->bshk", x, p["k"])
    v = project("bse,ehk->bshk", x, p["v"])
    return q, k, v


def attention_mask(query_positions, key_positions, kind: str, radius: int):
    """[sequence, memory_length] booleans: causal, and for `local` within the last `radius` positions
    (query i sees key j when 0 <= i - j < radius, Hugging Face GPTNeo's window_size)."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if kind == "local":
        allowed &= distance < radius
    return allowed


def attention_probabilities(q, k, mask):
    """Float32 softmax over unscaled scores (GPT-Neo and HF GPTNeo do not divide by sqrt(kv)).

    q [batch, sequence, heads, kv], k [batch, memory_length, heads, kv], mask broadcastable to
    [batch, heads, sequence, memory_length] -> probabilities of that shape.
    """
    scores = jnp.einsum("bqhk,bmhk->bhqm", q.astype(jnp.float32), k.astype(jnp.float32))
    return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)


def attend(q, k, v, mask):
    """Softmax attention of q over k and v: [batch, sequence, heads, kv]."""
    return jnp.einsum("bhqm,bmhk->bqhk", attention_probabilities(q, k, mask).astype(v.dtype), v)


def project_out(p, attended):
    """[batch, sequence, heads, kv] -> [batch, sequence, embd]."""
    return project("bqhk,hke->bqe", attended, p["out"]) + p["out_bias"]


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting the queries so that causal attention skips most of the
    keys no query can see: blocks of at least 128 queries, at most 8 of them (more blocks save
    little and cost compile time)."""
    count = min(8, -(-length // 128))
    size = -(-length // count)
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def attention_blocks(length: int, kind: str, radius: int) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, first_key) per query block: its queries [start, stop) see keys
    [first_key, stop) at most (keys after stop are in the future; a local window reaches back
    radius-1 positions)."""
    return tuple((start, stop, max(0, start - radius + 1) if kind == "local" else 0)
                 for start, stop in query_blocks(length))


def attention(p, x, kind: str, config, layout, dropout_rng=None):
    q, k, v = project_qkv(p, x)
    if layout is not None:
        q, k, v = (layout.constrain(t, ("batch", "sequence", "heads", "kv")) for t in (q, k, v))
    radius = config.local_attention_radius
    attention_dropout = dropout_rng is not None and config.attn_dropout > 0
    if fused_attention_applies(q, layout) and not attention_dropout:
        return project_out(p, fused_attention(q, k, v, kind, radius))
    blocks = attention_blocks(x.shape[1], kind, radius)
    keep = None
    if attention_dropout:  # one multiplier per probability: 0 where dropped, 1/(1-rate) where kept
        batch, _, heads, _ = q.shape
        keep = tuple(dropout(jax.random.fold_in(dropout_rng, index),
                             jnp.ones((batch, heads, stop - start, stop - first), q.dtype), config.attn_dropout)
                     for index, (start, stop, first) in enumerate(blocks))
    return project_out(p, blocked_attention(q, k, v, keep, blocks, kind, radius))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def blocked_attention(q, k, v, keep, blocks, kind: str, radius: int):
    """Causal attention, one query block at a time over only the keys it can see.

    q, k, v [batch, sequence, heads, kv] -> [batch, sequence, heads, kv]; `keep` is None or
    one dropout multiplier per block [batch, heads, queries, keys]. The gradient is written out
    rather than derived: the softmax's backward needs rowsum(dP * P), which equals
    rowsum(dOut * Out), a sum over kv instead of over every score (as flash attention does);
    and each block's key and value gradients are added into place, not padded to full length.
    """
    return _blocked_attention_forward(q, k, v, keep, blocks, kind, radius)[0]


def _blocked_attention_forward(q, k, v, keep, blocks, kind, radius):
    attended, all_probs = [], []
    for index, (start, stop, first) in enumerate(blocks):
        positions = jnp.arange(stop)
        mask = attention_mask(positions[start:stop], positions[first:stop], kind, radius)
        probs = attention_probabilities(q[:, start:stop], k[:, first:stop], mask)
        weights = probs if keep is None else probs * keep[index]
        attended.append(jnp.einsum("bhqm,bmhk->bqhk", weights.astype(v.dtype), v[:, first:stop]))
        all_probs.append(probs)
    out = jnp.concatenate(attended, axis=1)
    return out, (q, k, v, keep, out, all_probs)


def _blocked_attention_backward(blocks, kind, radius, residuals, d_out):
    q, k, v, keep, out, all_probs = residuals
    d_query_blocks = []
    d_key = jnp.zeros(k.shape, jnp.float32)
    d_value = jnp.zeros(v.shape, jnp.float32)
    for index, (start, stop, first) in enumerate(blocks):
        g = d_out[:, start:stop].astype(jnp.float32)
        probs = all_probs[index]
        weights = probs if keep is None else probs * keep[index]
        d_weights = jnp.einsum("bqhk,bmhk->bhqm", g, v[:, first:stop].astype(jnp.float32))
        d_probs = d_weights if keep is None else d_weights * keep[index]
        row_sums = jnp.einsum("bqhk,bqhk->bhq", g, out[:, start:stop].astype(jnp.float32))[..., None]
        d_scores = probs * (d_probs - row_sums)
        d_query_blocks.append(jnp.einsum("bhqm,bmhk->bqhk", d_scores, k[:, first:stop].astype(jnp.float32)))
        d_key = _add_into(d_key, jnp.einsum("bhqm,bqhk->bmhk", d_scores, q[:, start:stop].astype(jnp.float32)), first)
        d_value = _add_into(d_value, jnp.einsum("bhqm,bqhk->bmhk", weights, g), first)
    d_query = jnp.concatenate(d_query_blocks, axis=1)
    d_keep = None if keep is None else tuple(jnp.zeros_like(m) for m in keep)
    return d_query.astype(q.dtype), d_key.astype(k.dtype), d_value.astype(v.dtype), d_keep


def _add_into(total, part, first):
    """total[:, first:first+len(part)] += part, in place."""
    window = jax.lax.dynamic_slice_in_dim(total, first, part.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, window + part, first, axis=1)


blocked_attention.defvjp(_blocked_attention_forward, _blocked_attention_backward)


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
    h = project("bse,ei->bsi", x, p["fc"]) + p["fc_bias"]
    if layout is not None:
        h = layout.constrain(h, ("batch", "sequence", "intermediate_expanded"))
    h = ACTIVATIONS[config.activation_function](h)
    return project("bsi,ie->bse", h, p["proj"]) + p["proj_bias"]


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
