"""Attention, by kind: every kind a layer of `attention_types` can be is one `AttentionKind` in
`KINDS`, which gives its weights, how it is applied, its decoding cache and its FLOPs.

    global  softmax attention over every earlier position, and over num_mem_kv learned memory
            key/values that every query sees
    local   softmax attention over the last `local_attention_radius` positions (the query's own
            included: query i sees key j when 0 <= i - j < radius, Hugging Face GPTNeo's window)
    linear  linear attention (models/linear_attention.py), decoded from a running state
    gau     a gated attention unit (models/gau.py)
    none    no attention at all: the layer is an MLP block

With mlm_training every kind sees both ways (a masked-LM reads the whole text): global every
position; local key j when |i - j| < radius: the query, radius - 1 keys before it and radius - 1
after, 2 * radius - 1 in all. That is the causal window's rule (i - j < radius) mirrored, so that
local_attention_radius means the same reach in both objectives; GPT-Neo's "±radius" gives no exact
bound, and this reading never lets a query see farther than a causal one does. linear takes its
non-causal form; gau every position; none nothing. Softmax attention then runs on the plain kernel
(the others are causal), and there is no decoding: a masked-LM fills masks, it does not continue
a text.

Softmax attention is GPT-Neo's: scores q.k are not divided by sqrt(kv) (the init of q holds that
scale, see `softmax_weights`), and the softmax runs in float32 whatever the compute dtype. With
rotary_emb, q and k are rotated by their positions (models/positions.py) right after their
projections; memory keys are never rotated.

Decoding keeps a cache per layer and calls the same `apply` on the new positions only: global
and local attention and gau keep keys and values (models/kv_cache.py), linear attention its
running sums, none nothing. Memory key/values are weights, not cache entries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mesh import einsum
from models import kernels, kv_cache, lora
from models.dropout import dropout
from models.gau import gau_apply, gau_cache, gau_flops, gau_weights
from models.kv_cache import KeyValues, visible
from models.linear_attention import causal_linear_attention, constrained_state, empty_state, noncausal_linear_attention
from models.params import Weight, bias
from models.positions import rotate

MASK_VALUE = -1e9  # finite: a row with every key masked (a padding slot's query) gets no NaN

__all__ = ["KINDS", "visible", "probabilities", "attend", "softmax_weights"]


@dataclass(frozen=True)
class AttentionKind:
    weights: Callable  # (config) -> {name: Weight}
    # (p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None) -> (out, layer_cache);
    # positions [batch, sequence] default to the slots (a whole sequence from position 0)
    apply: Callable | None
    init_cache: Callable  # (config, batch, cache_slots, dtype, layout) -> the layer's cache (None: no cache)
    flops: Callable  # (config) -> training FLOPs per token beyond the projections, averaged over n_ctx


# --- softmax attention: the meaning -------------------------------------------------------------


def window(kind: str, config) -> int | None:
    """How far back a query sees: None (global) or local_attention_radius positions."""
    return config.local_attention_radius if kind == "local" else None


def probabilities(q, parts: list[KeyValues], layout=None):
    """Float32 softmax over the unscaled scores of q [batch, sequence, heads, kv] against the keys
    of every part taken together -> [batch, heads, sequence, memory_length], the parts' keys one
    after another along memory_length."""
    scores = [jnp.where(part.mask[:, None], einsum(f"bshk,{part.key_letters}->bhsm", q.astype(jnp.float32),
                                                   part.keys.astype(jnp.float32), layout=layout), MASK_VALUE)
              for part in parts]
    return jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)


def windowed_probabilities(q, k, query_slots, key_slots, window):
    return probabilities(q, [KeyValues(k, None, visible(query_slots, key_slots, window)[None])])


def attend(q, parts: list[KeyValues], layout=None, keep=None):
    """Softmax attention of q [batch, sequence, heads, kv] over the keys and values of every part
    taken together (a decoding cache and the new positions, the memory key/values: see
    models/kv_cache.py) -> [batch, sequence, heads, kv]; `keep`: dropout multipliers on the
    probabilities, or None."""
    probs = probabilities(q, parts, layout)
    if keep is not None:
        probs = probs * keep
    attended, start = None, 0
    for part in parts:
        size = part.mask.shape[-1]
        term = einsum(f"bhsm,{part.value_letters}->bshk", probs[..., start:start + size].astype(part.values.dtype),
                      part.values, layout=layout)
        attended, start = term if attended is None else attended + term, start + size
    return attended.astype(q.dtype)  # in the compute dtype, whatever the cache's (kernels.cache_dtype)


def softmax_weights(config) -> dict[str, Weight]:
    """q, k, v and the output, initialised as GPT-Neo's (mesh-tensorflow's) were: q with standard
    deviation (embd * kv)^-1/2, where the 1/sqrt(kv) that attention does not apply at run time
    lives; k and v embd^-1/2; the output (heads * kv)^-1/2; no q/k/v biases. (scale_by_depth and
    scale_by_in are the MLP's.)"""
    embd, kv = config.n_embd, config.head_dim
    return {
        "q": Weight(("embd", "heads", "kv"), (embd * kv) ** -0.5),
        "k": Weight(("embd", "heads", "kv"), embd ** -0.5),
        "v": Weight(("embd", "heads", "kv"), embd ** -0.5),
        "out": Weight(("heads", "kv", "embd"), (config.n_head * kv) ** -0.5),
        "out_bias": bias(("embd",)),
    }


def global_weights(config) -> dict[str, Weight]:
    """Softmax attention's, and with num_mem_kv the memory keys and values [mem_kv, heads, kv],
    each N(0, 1/sqrt(kv)) as GPT-Neo's."""
    weights = softmax_weights(config)
    if config.num_mem_kv:
        std = 1 / math.sqrt(config.head_dim)
        weights |= {"mem_k": Weight(("mem_kv", "heads", "kv"), std), "mem_v": Weight(("mem_kv", "heads", "kv"), std)}
    return weights


def query_key_value(p, x, slots, positions, config, layout):
    """x [batch, sequence, embd] -> q [batch, sequence, heads, kv], k and v [batch, memory_length,
    heads, kv], rotated by their positions with rotary_emb."""
    q = lora.project("bse,ehk->bshk", x, p, "q", config, layout)
    k = lora.project("bme,ehk->bmhk", x, p, "k", config, layout)
    v = lora.project("bme,ehk->bmhk", x, p, "v", config, layout)
    if config.rotary_emb:  # before the cache: a cached key keeps the rotation of its own position
        if positions is None:
            positions = jnp.broadcast_to(slots, x.shape[:2])
        q = rotate(q, positions, layout)
        k = rotate(k, positions, layout, "bmhk")
    return q, k, v


def softmax_attention(kind: str):
    def apply(p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None):
        """x [batch, sequence, embd] at `slots` [sequence], each token at positions [batch, sequence]
        of its text -> ([batch, sequence, embd], layer_cache)."""
        q, k, v = query_key_value(p, x, slots, positions, config, layout)
        reach = window(kind, config)
        memory = (p["mem_k"], p["mem_v"]) if "mem_k" in p and kind == "global" else None
        if layer_cache is not None and config.mlm_training:
            raise ValueError("a masked-LM model (mlm_training) sees both ways: it has no decoding cache")
        if layer_cache is None:
            attended = self_attention(q, k, v, reach, memory, config, layout, rng)
        else:
            attended = attend(q, memory_part(memory, q) + kv_cache.view(k, v, slots, first_slot, layer_cache, reach),
                              layout)
            layer_cache = kv_cache.store(k, v, slots, layer_cache, reach, layout, after=attended)
        return lora.project("bshk,hke->bse", attended, p, "out", config, layout) + p["out_bias"], layer_cache

    return apply


def memory_part(memory, q) -> list[KeyValues]:
    """The memory key/values [mem_kv, heads, kv] as the first part every query sees (none
    without num_mem_kv)."""
    if memory is None:
        return []
    mem_k, mem_v = memory
    return [KeyValues(mem_k, mem_v, jnp.ones((1, q.shape[1], mem_k.shape[0]), bool), "mhk", "mhk")]


def self_attention(q, k, v, reach, memory, config, layout, rng):
    """Attention of a whole sequence over itself (and the memory), by the kernel `attention_kernel`
    chooses: causal, or with mlm_training both ways (the plain kernel)."""
    attention_dropout = rng is not None and config.attn_dropout > 0
    kernel = kernels.choose_attention_kernel(config, q, layout, attention_dropout, memory is not None)
    if kernel == "cudnn":
        return kernels.fused_attention(q, k, v, reach)
    length = q.shape[1]
    batch, heads = q.shape[0], q.shape[2]
    if kernel == "plain":
        slots = jnp.arange(length)
        parts = memory_part(memory, q) + [KeyValues(k, v, visible(slots, slots, reach, causal=not config.mlm_training)[None])]
        keep = None
        if attention_dropout:
            keys = sum(part.mask.shape[-1] for part in parts)
            keep = dropout(rng, jnp.ones((batch, heads, length, keys), q.dtype), config.attn_dropout)
        return attend(q, parts, layout, keep)
    blocks = kernels.attention_blocks(length, reach)
    keep = None
    if attention_dropout:  # one multiplier per probability: 0 where dropped, 1/(1-rate) where kept
        keep = tuple(dropout(jax.random.fold_in(rng, index),
                             jnp.ones((batch, heads, stop - start, stop - first), q.dtype), config.attn_dropout)
                     for index, (start, stop, first) in enumerate(blocks))
    block_probabilities = functools.partial(windowed_probabilities, window=reach)
    return kernels.blocked_attention(q, k, v, keep, blocks, block_probabilities)


def softmax_cache(kind: str):
    def init_cache(config, batch: int, cache_slots: int, dtype, layout):
        return kv_cache.empty(batch, config.n_head, cache_slots, window(kind, config), config.head_dim, dtype, layout)

    return init_cache


def softmax_flops(kind: str):
    def count(config) -> float:
        """q.k and probs.v (2 * embd each) over the keys a query sees, averaged over the positions
        of an n_ctx sequence, forward and backward (x3)."""
        n = config.n_ctx
        radius = min(config.local_attention_radius, n)
        if kind == "global":
            keys = (n if config.mlm_training else (n + 1) / 2) + config.num_mem_kv
        elif config.mlm_training:  # |i - j| < radius: 2 * radius - 1 keys, fewer within radius of either end
            keys = 2 * radius - 1 - radius * (radius - 1) / n
        else:
            keys = radius - radius * (radius - 1) / (2 * n)
        return 12 * config.n_embd * keys

    return count


# --- linear attention -----------------------------------------------------------------------------


def linear_apply(p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None):
    """Softmax attention's projections around models/linear_attention.py: the causal form, or with
    mlm_training the non-causal one."""
    q, k, v = query_key_value(p, x, slots, positions, config, layout)
    if config.mlm_training:
        attended = noncausal_linear_attention(q, k, v)
    elif layer_cache is None:
        attended, _ = causal_linear_attention(q, k, v)
    else:
        key_valid = slots[None, :] >= first_slot[:, None]
        attended, layer_cache = causal_linear_attention(q, k, v, layer_cache, key_valid)
        layer_cache = constrained_state(layer_cache, layout)
    if layout is not None:
        attended = layout.constrain_letters(attended, "bshk")
    return lora.project("bshk,hke->bse", attended, p, "out", config, layout) + p["out_bias"], layer_cache


def linear_flops(config) -> float:
    """Per token, adding phi_k (x) v to the state and reading phi_q . S: 2 * kv * kv per head each,
    forward and backward (x3); the chunked form does about as much."""
    return 12 * config.n_embd * config.head_dim


# --- the registry -------------------------------------------------------------------------------

KINDS: dict[str, AttentionKind] = {
    "global": AttentionKind(global_weights, softmax_attention("global"), softmax_cache("global"), softmax_flops("global")),
    "local": AttentionKind(softmax_weights, softmax_attention("local"), softmax_cache("local"), softmax_flops("local")),
    "linear": AttentionKind(softmax_weights, linear_apply,
                            lambda config, batch, cache_slots, dtype, layout: empty_state(config, batch, layout),
                            linear_flops),
    "gau": AttentionKind(gau_weights, gau_apply, gau_cache, gau_flops),
    "none": AttentionKind(lambda config: {}, None, lambda config, batch, cache_slots, dtype, layout: None,
                          lambda config: 0.0),
}
