"""Attention, by kind: every kind a layer of `attention_types` can be is one `AttentionKind` in
`KINDS`, which gives its weights, how it is applied, its decoding cache and its FLOPs.

    global  softmax attention over every earlier position
    local   softmax attention over the last `local_attention_radius` positions (the query's own
            included: query i sees key j when 0 <= i - j < radius, Hugging Face GPTNeo's window)
    none    no attention at all: the layer is an MLP block

Softmax attention is GPT-Neo's: scores q.k are not divided by sqrt(kv), and the softmax runs in
float32 whatever the compute dtype. With rotary_emb, q and k are rotated by their positions
(models/positions.py) right after their projections.

Decoding keeps a cache per layer and calls the same `apply` on the new positions only. Cache
slots are the positions of the cache, the same for every row of a batch; a row whose prompt is
left-padded starts at slot `first_slot[row]` (slots before it are masked out of every
attention), so that every row's newest token is in the same slot. The cache, in dimension
letters (mesh.DIMENSION_LETTERS):
    global  k, v [batch, heads, memory_length, kv]: one entry per slot
    local   k, v [batch, heads, memory_length, kv]: a ring of `radius` entries, slot s at s % radius,
            so that a step reads only the keys it can see
    none    no cache
Heads come before memory_length in a cache (unlike the [batch, memory_length, heads, kv] keys of
a full pass) because a matrix multiply wants (batch, heads) leading: in the other order XLA
copies a transposed cache in every step of every layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mesh import einsum
from models import kernels
from models.dropout import dropout
from models.kernels import project
from models.params import Weight, bias, projection_std
from models.positions import rotate

MASK_VALUE = -1e9  # finite: a row with every key masked (a padding slot's query) gets no NaN
CACHE_LETTERS = "bhmk"


@dataclass(frozen=True)
class AttentionKind:
    weights: Callable  # (config) -> {name: Weight}
    # (p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None) -> (out, layer_cache);
    # positions [batch, sequence] default to the slots (a whole sequence from position 0)
    apply: Callable | None
    init_cache: Callable  # (config, batch, cache_slots, dtype) -> the layer's cache (None: no cache)
    attended_keys: Callable  # (config) -> keys a query attends to, averaged over a sequence of n_ctx


# --- softmax attention: the meaning -------------------------------------------------------------


def window(kind: str, config) -> int | None:
    """How far back a query sees: None (global) or local_attention_radius positions."""
    return config.local_attention_radius if kind == "local" else None


def visible(query_slots, key_slots, window: int | None):
    """[..., sequence, memory_length] booleans: key j is visible to query i when j <= i and, with
    a window, i - j < window. Broadcasts over leading batch dimensions."""
    distance = query_slots[..., :, None] - key_slots[..., None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def probabilities(q, k, mask, layout=None, key_letters: str = "bmhk"):
    """Float32 softmax over unscaled scores. q [batch, sequence, heads, kv], k [batch,
    memory_length, heads, kv] (or a cache's [batch, heads, memory_length, kv]: key_letters "bhmk"),
    mask broadcastable to [batch, heads, sequence, memory_length]."""
    scores = einsum(f"bshk,{key_letters}->bhsm", q.astype(jnp.float32), k.astype(jnp.float32), layout=layout)
    return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)


def windowed_probabilities(q, k, query_slots, key_slots, window):
    return probabilities(q, k, visible(query_slots, key_slots, window))


def attend(q, k, v, mask, layout=None, keep=None, key_letters: str = "bmhk"):
    """Softmax attention of q over k and v -> [batch, sequence, heads, kv]; `keep`: dropout
    multipliers on the probabilities, or None."""
    probs = probabilities(q, k, mask, layout, key_letters)
    if keep is not None:
        probs = probs * keep
    return einsum(f"bhsm,{key_letters}->bshk", probs.astype(v.dtype), v, layout=layout)


def softmax_weights(config) -> dict[str, Weight]:
    std = projection_std(config, config.n_embd)
    return {
        "q": Weight(("embd", "heads", "kv"), std),
        "k": Weight(("embd", "heads", "kv"), std),
        "v": Weight(("embd", "heads", "kv"), std),
        "out": Weight(("heads", "kv", "embd"), projection_std(config, config.n_embd, residual_output=True)),
        "out_bias": bias(("embd",)),
    }


def softmax_attention(kind: str):
    def apply(p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None):
        """x [batch, sequence, embd] at `slots` [sequence], each token at positions [batch, sequence]
        of its text -> ([batch, sequence, embd], layer_cache)."""
        q = project("bse,ehk->bshk", x, p["q"], config, layout)
        k = project("bme,ehk->bmhk", x, p["k"], config, layout)
        v = project("bme,ehk->bmhk", x, p["v"], config, layout)
        if config.rotary_emb:  # before the cache: a cached key keeps the rotation of its own position
            if positions is None:
                positions = jnp.broadcast_to(slots, x.shape[:2])
            q = rotate(q, positions, layout)
            k = rotate(k, positions, layout, "bmhk")
        reach = window(kind, config)
        if layer_cache is None:
            attended = self_attention(q, k, v, reach, config, layout, rng)
        else:
            attended, layer_cache = cached_attention(q, k, v, slots, first_slot, layer_cache, reach, layout)
        return project("bshk,hke->bse", attended, p["out"], config, layout) + p["out_bias"], layer_cache

    return apply


def self_attention(q, k, v, reach, config, layout, rng):
    """Causal attention of a whole sequence over itself, by the kernel `attention_kernel` chooses."""
    attention_dropout = rng is not None and config.attn_dropout > 0
    kernel = kernels.choose_attention_kernel(config, q, layout, attention_dropout)
    if kernel == "cudnn":
        return kernels.fused_attention(q, k, v, reach)
    length = q.shape[1]
    batch, heads = q.shape[0], q.shape[2]
    if kernel == "plain":
        slots = jnp.arange(length)
        keep = None
        if attention_dropout:
            keep = dropout(rng, jnp.ones((batch, heads, length, length), q.dtype), config.attn_dropout)
        return attend(q, k, v, visible(slots, slots, reach), layout, keep)
    blocks = kernels.attention_blocks(length, reach)
    keep = None
    if attention_dropout:  # one multiplier per probability: 0 where dropped, 1/(1-rate) where kept
        keep = tuple(dropout(jax.random.fold_in(rng, index),
                             jnp.ones((batch, heads, stop - start, stop - first), q.dtype), config.attn_dropout)
                     for index, (start, stop, first) in enumerate(blocks))
    block_probabilities = functools.partial(windowed_probabilities, window=reach)
    return kernels.blocked_attention(q, k, v, keep, blocks, block_probabilities)


# --- softmax attention: the decoding cache ------------------------------------------------------


def softmax_cache(kind: str):
    def init_cache(config, batch: int, cache_slots: int, dtype):
        reach = window(kind, config)
        length = cache_slots if reach is None else min(reach, cache_slots)
        shape = (batch, config.n_head, length, config.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    return init_cache


def cached_attention(q, k, v, slots, first_slot, layer_cache, reach, layout):
    """q, k, v [batch, sequence, heads, kv] of new positions at `slots` [sequence] (consecutive,
    the same for every row): store k and v in the cache, attend over everything visible."""
    new = {"k": jnp.einsum("bmhk->bhmk", k), "v": jnp.einsum("bmhk->bhmk", v)}
    length = layer_cache["k"].shape[2]
    next_slot = slots[0]
    if reach is None or length < reach:  # one entry per slot: the cache never wraps
        layer_cache = {name: _write(layer_cache[name], new[name], next_slot, layout) for name in new}
        keys, values, key_slots = layer_cache["k"], layer_cache["v"], jnp.arange(length)
    elif q.shape[1] == 1:
        # the entry one new key overwrites holds slot - radius, which its query no longer sees
        layer_cache = {name: _write_ring(layer_cache[name], new[name], next_slot, layout) for name in new}
        keys, values, key_slots = layer_cache["k"], layer_cache["v"], _ring_slots(next_slot + 1, length)
    else:  # earlier new queries may need entries that later new keys overwrite: attend to both
        keys, values = (jnp.concatenate([layer_cache[name], new[name]], axis=2) for name in ("k", "v"))
        key_slots = jnp.concatenate([_ring_slots(next_slot, length), slots])
        layer_cache = {name: _write_ring(layer_cache[name], new[name], next_slot, layout) for name in new}
    mask = visible(slots, key_slots, reach)[None] & (key_slots >= first_slot[:, None])[:, None, :]  # [b, s, m]
    return attend(q, keys, values, mask[:, None], layout, key_letters=CACHE_LETTERS), layer_cache


def _write(cache, new, first, layout):
    """cache [batch, heads, memory_length, kv] with `new` written at entries first, first+1, ..."""
    return layout_constrained(jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, first, 0)), layout)


def _write_ring(ring, new, first_slot, layout):
    """The ring with new [batch, heads, n, kv] of slots first_slot.. written at slot % length."""
    length, count = ring.shape[2], new.shape[2]
    if count >= length:  # only the last `length` new entries stay
        new, first_slot, count = new[:, :, -length:], first_slot + count - length, length
    new = new.astype(ring.dtype)
    if count == 1:
        return _write(ring, new, first_slot % length, layout)
    return layout_constrained(ring.at[:, :, (first_slot + jnp.arange(count)) % length].set(new), layout)


def _ring_slots(next_slot, length: int):
    """The slot each ring entry holds once slots < next_slot are written: the newest slot
    congruent to the entry's index (negative: not written yet, masked as padding is)."""
    index = jnp.arange(length)
    return next_slot - 1 - jnp.mod(next_slot - 1 - index, length)


def layout_constrained(cache, layout):
    return cache if layout is None else layout.constrain_letters(cache, CACHE_LETTERS)


def attended_keys(kind: str):
    def count(config) -> float:
        """Keys a query sees, averaged over the positions of an n_ctx sequence."""
        n = config.n_ctx
        if kind == "global":
            return (n + 1) / 2
        radius = min(config.local_attention_radius, n)
        return radius - radius * (radius - 1) / (2 * n)

    return count


# --- the registry -------------------------------------------------------------------------------

KINDS: dict[str, AttentionKind] = {
    "global": AttentionKind(softmax_weights, softmax_attention("global"), softmax_cache("global"),
                            attended_keys("global")),
    "local": AttentionKind(softmax_weights, softmax_attention("local"), softmax_cache("local"),
                           attended_keys("local")),
    "none": AttentionKind(lambda config: {}, None, lambda config, batch, cache_slots, dtype: None,
                          lambda config: 0.0),
}
