"""Speed only: ways of computing what the model means that run faster on some backend.

Nothing here changes a result beyond float rounding, and each can be switched off:
- `project`: every projection. In a decoding step (one position per row) with
  `decode_product: weights_first` it multiplies each weight, read out-first, by the rows
  (`weights_first`); otherwise, with `cpu_backward: written` (and `auto` on a CPU) its backward
  is written out for XLA:CPU's matmul kernels; `cpu_backward: plain`, and `auto` on every other
  backend, use JAX's derived one.
- `residual_gradient_boundary`: with the written backward the residual stream's gradient is
  computed once per layer instead of being recomputed inside every weight gradient.
- `cache_dtype` and `ordered_after`: the decoding cache's dtype, and its update in place
  (models/kv_cache.py).
- attention, chosen by `attention_kernel` (`choose_attention_kernel`): `plain` is the reference
  (models/attention.py, one score matrix); `blocked` computes causal attention one block of
  queries at a time over only the keys they can see, with a written-out backward; `cudnn` is
  cuDNN's fused kernel on a GPU. `auto` takes cudnn where it applies, else blocked.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from errors import ConfigError

# --- projections ----------------------------------------------------------------------------


def uses_cpu_backward(config) -> bool:
    return config.cpu_backward == "written" or (config.cpu_backward == "auto" and jax.default_backend() == "cpu")


def project(spec: str, x, w, config, layout=None):
    """`jnp.einsum(spec, x, w)` for a projection "<rows><in>,<in><out>-><rows><out>" in dimension
    letters (mesh.DIMENSION_LETTERS): x's trailing dimensions contract with w's leading ones, e.g.
    "bse,ehk->bshk". The result is constrained to the layout by the output's letters."""
    operands, output = spec.split("->")
    x_letters, w_letters = operands.split(",")
    contracted = len([letter for letter in x_letters if letter in w_letters and letter not in output])
    if not contracted or x_letters[-contracted:] != w_letters[:contracted] or \
            output != x_letters[:-contracted] + w_letters[contracted:]:
        raise ValueError(f"project: {spec!r} is not of the form '<rows><in>,<in><out>-><rows><out>'")
    if config.decode_product == "weights_first" and one_position_per_row(x, contracted):
        out = weights_first(x, _leading_swapped(w, contracted), contracted)
    elif uses_cpu_backward(config):
        out = _cpu_projection(x, w, contracted)
    else:
        out = jnp.einsum(spec, x, w)
    return out if layout is None else layout.constrain_letters(out, output)


def one_position_per_row(x, contracted: int) -> bool:
    """Whether x [batch, positions..., in...] holds one position per batch row: a decoding step."""
    return x.size == x.shape[0] * math.prod(x.shape[x.ndim - contracted:])


def weights_first(x, w_out_first, contracted: int = 1):
    """x [rows..., in...] times a weight given out-first, [out..., in...] -> [rows..., out...],
    computed as W . x^T and the small result transposed back (`decode_product: weights_first`).
    With a few rows, some CPUs' matmul kernels read the weight at close to the memory bandwidth
    in this order and at half of it in x . W (125M on a Zen 4, 8 rows: the vocabulary
    projection 12.1 -> 7.7 ms). In a decoding loop the weight's transpose (`_leading_swapped`,
    which `project` applies to a weight stored [in..., out...]) depends on nothing the loop
    changes, so XLA hoists it out: made once per generation, kept beside the stored weights.
    Accumulates in float32 as `product` does."""
    out_dims = w_out_first.ndim - contracted
    result = jnp.tensordot(w_out_first, x, (tuple(range(out_dims, w_out_first.ndim)), tuple(range(x.ndim - contracted, x.ndim))),
                           preferred_element_type=jnp.float32)
    # behind a barrier: else XLA folds the transpose back into the product, which is x . W again
    result = jax.lax.optimization_barrier(result)
    return jnp.transpose(result, (*range(out_dims, result.ndim), *range(out_dims))).astype(jnp.result_type(x, w_out_first))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_projection(x, w, contracted: int):
    """x @ w over `contracted` dimensions, with a backward written for XLA's CPU backend.

    Its matmul kernels are fastest when both operands are row-major with the contraction between
    them ([rows, in] @ [in, out]). The derived backward's products x^T @ g and g @ w^T are not:
    XLA either runs a slower kernel on them or transposes an activation inside a fusion that also
    recomputes its producer (one such 25 MB transpose took 112 ms). Here each product gets its
    operands transposed once, behind an optimization barrier so that XLA keeps the plain copy; and
    the weight gradient transposes whichever side is smaller: x, or g and the weight-sized result.
    Each product accumulates in float32 (`product`).
    """
    return product(x, w, contracted)


def _cpu_projection_forward(x, w, contracted):
    return _cpu_projection(x, w, contracted), (x, w)


def _cpu_projection_backward(contracted, residuals, g):
    x, w = residuals
    row_dims, out_dims = x.ndim - contracted, w.ndim - contracted
    d_x = product(g, _leading_swapped(w, contracted), out_dims)
    rows, out_size = math.prod(x.shape[:row_dims]), math.prod(w.shape[contracted:])
    in_size = w.size // out_size
    if rows * in_size <= rows * out_size + w.size:
        d_w = product(_leading_swapped(x, row_dims), g, row_dims)
    else:
        d_w = _leading_swapped(product(_leading_swapped(g, row_dims), x, row_dims), out_dims)
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


def product(a, b, contracted: int = 1):
    """tensordot accumulating in float32, in the operands' dtype: how every projection asks for its
    products on a CPU, and so how metrics.matmul_roofline and machine.py's dot probe time theirs. The same result as XLA:CPU's
    own handling of a bfloat16 product (it computes it in float32 and rounds the output), but
    asked for this way XLA:CPU passes bfloat16 operands to its dot library, which reads half the
    bytes, instead of converting them to float32 first (or, for weights in a decoding loop,
    converting them once and streaming float32 at every step)."""
    dtype = jnp.result_type(a, b)
    return jnp.tensordot(a, b, contracted, preferred_element_type=jnp.float32).astype(dtype)


def _leading_swapped(a, leading: int):
    """`a` with its first `leading` dimensions moved to the end, materialised as such: behind an
    optimization barrier XLA may not fold the transpose back into the matmul that consumes it."""
    return jax.lax.optimization_barrier(jnp.transpose(a, (*range(leading, a.ndim), *range(leading))))


_cpu_projection.defvjp(_cpu_projection_forward, _cpu_projection_backward)


# --- the residual stream's gradient ---------------------------------------------------------


def residual_gradient_boundary(x, config):
    """The identity; with the written backward (uses_cpu_backward) the backward pass computes x's
    gradient here, once."""
    return _materialise_gradient(x) if uses_cpu_backward(config) else x


@jax.custom_vjp
def _materialise_gradient(x):
    """XLA's CPU fusion copies cheap elementwise producers into every consumer. The residual
    stream's gradient is a chain of elementwise adds through all layers, so without a boundary
    every layer's weight-gradient fusion recomputes it from the top: quadratic in n_layer, a
    third of a 12-layer step. A conditional is a fusion boundary. Both branches are the
    identity, written differently so that the compiler keeps them apart, and the predicate
    comes out of an optimization barrier so that it cannot be folded away. It depends on no data:
    one read from a sharded gradient would be a collective per layer, and under a vmap (the
    microbatch loop's batch replicas) a batched predicate would turn the conditional into a select,
    which is no boundary. (On other backends a conditional would cost a host sync; they never get here.)
    """
    return x


def _materialise_forward(x):
    return x, None


def _materialise_backward(_, gradient):
    opaque_true = jax.lax.optimization_barrier(jnp.zeros((), jnp.int32)) == 0
    return (jax.lax.cond(opaque_true, lambda g: g, lambda g: g + 0, gradient),)


_materialise_gradient.defvjp(_materialise_forward, _materialise_backward)


# --- the decoding cache ----------------------------------------------------------------------


def cache_dtype(compute_dtype):
    """The decoding cache's dtype: the compute dtype, but float32 on a CPU, where XLA converts a
    bfloat16 cache to float32 for each step's products (125M, batch 8, decode_precision bfloat16:
    15 of 60 ms a step). Keys and values computed in bfloat16 are stored exactly."""
    return jnp.float32 if jax.default_backend() == "cpu" else compute_dtype


def ordered_after(x, dependency):
    """x, unchanged, but computed from `dependency` (an array x's shape broadcasts it to), so that
    whatever uses x runs after whatever `dependency` needed. XLA updates a loop-carried buffer (a
    decoding cache) in place only when the update depends on every read of the old contents;
    otherwise it copies the whole buffer first, at every step. The term added is
    min(isnan(dependency), 0): always exactly 0, which no simplification can see. Per element, so
    a sharded x needs no communication."""
    return x + jnp.minimum(jnp.isnan(dependency), 0).astype(x.dtype)


# --- attention kernels -----------------------------------------------------------------------


def choose_attention_kernel(config, q, layout, attention_dropout: bool, memory: bool = False) -> str:
    """plain | blocked | cudnn for causal self-attention over q [batch, sequence, heads, kv];
    `memory`: the keys begin with num_mem_kv memory entries, which only plain attention takes.
    With mlm_training (attention both ways) only plain."""
    chosen = config.attention_kernel
    if config.mlm_training:  # blocked and cudnn attention are causal; a masked-LM sees both ways
        if chosen not in ("auto", "plain"):
            raise ConfigError(f"{config.source}: key 'attention_kernel' = {chosen!r} is causal attention only, and "
                              "mlm_training attends both ways; use auto or plain")
        return "plain"
    if memory:
        if chosen not in ("auto", "plain"):
            raise ConfigError(f"{config.source}: key 'attention_kernel' = {chosen!r} does not take the memory "
                              f"key/values of num_mem_kv = {config.num_mem_kv}; use auto or plain")
        return "plain"
    if chosen == "auto":
        return "cudnn" if cudnn_refusal(q, layout, attention_dropout) is None else "blocked"
    if chosen == "cudnn":
        reason = cudnn_refusal(q, layout, attention_dropout)
        if reason is not None:
            raise ConfigError(f"{config.source}: key 'attention_kernel' = 'cudnn': {reason}; "
                              "use auto, blocked or plain")
    return chosen


def cudnn_refusal(q, layout, attention_dropout: bool) -> str | None:
    """Why cuDNN's fused attention cannot run here, or None. It takes half-precision q/k/v on a
    GPU, a head size that is a multiple of 8 up to 128, and (to train) an even sequence length;
    the sequence and kv dimensions must be whole on each device; it has no attention dropout."""
    if jax.default_backend() != "gpu":
        return f"it runs on a GPU only (this backend is {jax.default_backend()})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return "it needs precision bfloat16"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"the head size {q.shape[-1]} is not a multiple of 8 up to 128"
    if q.shape[1] % 2:
        return f"the sequence length {q.shape[1]} is odd"
    if layout is not None and any(layout.layout.get(dim) for dim in ("sequence", "memory_length", "kv")):
        return "the layout splits sequence, memory_length or kv"
    if attention_dropout:
        return "it has no attention dropout (attn_dropout > 0)"
    return None


def fused_attention(q, k, v, window: int | None):
    """Causal attention in one cuDNN kernel (no score matrix in memory), unscaled as GPT-Neo's:
    softmax in float32 inside the kernel. With a window, a query sees itself and window-1 keys before."""
    local_window = (window - 1, 0) if window is not None else None
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, local_window_size=local_window,
                                        implementation="cudnn")


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting the queries so that causal attention skips most of the
    keys no query can see: blocks of at least 128 queries, at most 8 of them (more blocks save
    little and cost compile time)."""
    count = min(8, -(-length // 128))
    size = -(-length // count)
    return [(start, min(length, start + size)) for start in range(0, length, size)]


def attention_blocks(length: int, window: int | None) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, first_key) per query block: its queries [start, stop) see keys
    [first_key, stop) at most (keys after stop are in the future; a window reaches back
    window-1 positions)."""
    return tuple((start, stop, max(0, start - window + 1) if window is not None else 0)
                 for start, stop in query_blocks(length))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(q, k, v, keep, blocks, probabilities):
    """Causal attention, one query block at a time over only the keys it can see.

    q [batch, sequence, heads, kv], k and v [batch, memory_length, heads, kv] over the same
    positions -> [batch, sequence, heads, kv]. `probabilities(q, k, query_slots, key_slots)` is
    the attention's meaning (models/attention.py), applied to each block: the backward below
    assumes it is a masked softmax of the unscaled scores q.k. `keep` is None or one
    dropout multiplier per block [batch, heads, queries, keys]. The gradient is written out
    rather than derived: the softmax's backward needs rowsum(dP * P), which equals
    rowsum(dOut * Out), a sum over kv instead of over every score (as flash attention does);
    and each block's key and value gradients are added into place, not padded to full length.
    """
    return _blocked_attention_forward(q, k, v, keep, blocks, probabilities)[0]


def _blocked_attention_forward(q, k, v, keep, blocks, probabilities):
    attended, all_probs = [], []
    for index, (start, stop, first) in enumerate(blocks):
        slots = jnp.arange(stop)
        probs = probabilities(q[:, start:stop], k[:, first:stop], slots[start:stop], slots[first:stop])
        weights = probs if keep is None else probs * keep[index]
        attended.append(jnp.einsum("bhsm,bmhk->bshk", weights.astype(v.dtype), v[:, first:stop]))
        all_probs.append(probs)
    out = jnp.concatenate(attended, axis=1)
    return out, (q, k, v, keep, out, all_probs)


def _blocked_attention_backward(blocks, probabilities, residuals, d_out):
    q, k, v, keep, out, all_probs = residuals
    d_query_blocks = []
    d_key = jnp.zeros(k.shape, jnp.float32)
    d_value = jnp.zeros(v.shape, jnp.float32)
    for index, (start, stop, first) in enumerate(blocks):
        g = d_out[:, start:stop].astype(jnp.float32)
        probs = all_probs[index]
        weights = probs if keep is None else probs * keep[index]
        d_weights = jnp.einsum("bshk,bmhk->bhsm", g, v[:, first:stop].astype(jnp.float32))
        d_probs = d_weights if keep is None else d_weights * keep[index]
        row_sums = jnp.einsum("bshk,bshk->bhs", g, out[:, start:stop].astype(jnp.float32))[..., None]
        d_scores = probs * (d_probs - row_sums)
        d_query_blocks.append(jnp.einsum("bhsm,bmhk->bshk", d_scores, k[:, first:stop].astype(jnp.float32)))
        d_key = _add_into(d_key, jnp.einsum("bhsm,bshk->bmhk", d_scores, q[:, start:stop].astype(jnp.float32)), first)
        d_value = _add_into(d_value, jnp.einsum("bhsm,bshk->bmhk", weights, g), first)
    d_query = jnp.concatenate(d_query_blocks, axis=1)
    d_keep = None if keep is None else tuple(jnp.zeros_like(m) for m in keep)
    return d_query.astype(q.dtype), d_key.astype(k.dtype), d_value.astype(v.dtype), d_keep


def _add_into(total, part, first):
    """total[:, first:first+len(part)] += part, in place."""
    window = jax.lax.dynamic_slice_in_dim(total, first, part.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, window + part, first, axis=1)


blocked_attention.defvjp(_blocked_attention_forward, _blocked_attention_backward)
