"""The decoding cache of the attention kinds that keep keys and values (global, local, gau).

Cache slots are the positions of the cache, the same for every row of a batch; a row whose prompt
is left-padded starts at slot `first_slot[row]` (slots before it are masked out of every
attention), so that every row's newest token is in the same slot. A layer's cache holds k and v
[batch, heads, memory_length, kv] (CACHE_LETTERS):
    one entry per slot      global attention and gau (gau has one head), never wrapping
    a ring of `window`      local attention: slot s at entry s % window, so that a step reads
                            only the keys it can see
Heads come before memory_length (unlike the [batch, memory_length, heads, kv] keys of a full
pass) because a matrix multiply wants (batch, heads) leading: in the other order XLA copies a
transposed cache in every step of every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CACHE_LETTERS = "bhmk"
CACHE_DIMENSIONS = ("batch", "heads", "memory_length", "kv")


def visible(query_slots, key_slots, window: int | None, causal: bool = True):
    """[..., sequence, memory_length] booleans: key j is visible to query i when j <= i and, with
    a window, i - j < window. Broadcasts over leading batch dimensions. Not causal (the masked-LM
    objective): every key, or with a window those with |i - j| < window, the causal window
    mirrored (the query, window - 1 keys before it and window - 1 after)."""
    distance = query_slots[..., :, None] - key_slots[..., None, :]
    if not causal:
        distance = jnp.abs(distance)
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def empty(batch: int, heads: int, cache_slots: int, window: int | None, size: int, dtype, layout,
          dims=CACHE_DIMENSIONS) -> dict:
    """A layer's empty cache: k and v [batch, heads, entries, size], `entries` the slots, or a
    ring of `window` entries when that is shorter. `dims` names its dimensions for the layout."""
    length = cache_slots if window is None else min(window, cache_slots)
    shape = (batch, heads, length, size)
    return {name: constrained(jnp.zeros(shape, dtype), layout, dims) for name in ("k", "v")}


def store_and_view(k, v, slots, first_slot, layer_cache, window: int | None, layout, dims=CACHE_DIMENSIONS):
    """k, v [batch, sequence, heads, kv] of new positions at `slots` [sequence] (consecutive, the
    same for every row) -> (keys, values [batch, heads, memory_length, kv], mask [batch, sequence,
    memory_length] of the keys each new query sees, the cache with k and v stored)."""
    new = {"k": jnp.einsum("bmhk->bhmk", k), "v": jnp.einsum("bmhk->bhmk", v)}
    length = layer_cache["k"].shape[2]
    next_slot = slots[0]
    if window is None or length < window:  # one entry per slot: the cache never wraps
        layer_cache = {name: _write(layer_cache[name], new[name], next_slot, layout, dims) for name in new}
        keys, values, key_slots = layer_cache["k"], layer_cache["v"], jnp.arange(length)
    elif k.shape[1] == 1:
        # the entry one new key overwrites holds slot - window, which its query no longer sees
        layer_cache = {name: _write_ring(layer_cache[name], new[name], next_slot, layout, dims) for name in new}
        keys, values, key_slots = layer_cache["k"], layer_cache["v"], _ring_slots(next_slot + 1, length)
    else:  # earlier new queries may need entries that later new keys overwrite: attend to both
        keys, values = (jnp.concatenate([layer_cache[name], new[name]], axis=2) for name in ("k", "v"))
        key_slots = jnp.concatenate([_ring_slots(next_slot, length), slots])
        layer_cache = {name: _write_ring(layer_cache[name], new[name], next_slot, layout, dims) for name in new}
    mask = visible(slots, key_slots, window)[None] & (key_slots >= first_slot[:, None])[:, None, :]
    return keys, values, mask, layer_cache


def _write(cache, new, first, layout, dims):
    """cache [batch, heads, memory_length, kv] with `new` written at entries first, first+1, ..."""
    return constrained(jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, first, 0)), layout, dims)


def _write_ring(ring, new, first_slot, layout, dims):
    """The ring with new [batch, heads, n, kv] of slots first_slot.. written at slot % length."""
    length, count = ring.shape[2], new.shape[2]
    if count >= length:  # only the last `length` new entries stay
        new, first_slot, count = new[:, :, -length:], first_slot + count - length, length
    new = new.astype(ring.dtype)
    if count == 1:
        return _write(ring, new, first_slot % length, layout, dims)
    return constrained(ring.at[:, :, (first_slot + jnp.arange(count)) % length].set(new), layout, dims)


def _ring_slots(next_slot, length: int):
    """The slot each ring entry holds once slots < next_slot are written: the newest slot
    congruent to the entry's index (negative: not written yet, masked as padding is)."""
    index = jnp.arange(length)
    return next_slot - 1 - jnp.mod(next_slot - 1 - index, length)


def constrained(array, layout, dims=CACHE_DIMENSIONS):
    return array if layout is None else layout.constrain(array, dims)
