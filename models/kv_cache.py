"""The decoding cache of the attention kinds that keep keys and values (global, local, gau).

Cache slots are the positions of the cache, the same for every row of a batch; a row whose prompt
is left-padded starts at slot `first_slot[row]` (slots before it are masked out of every
attention), so that every row's newest token is in the same slot. A layer's cache holds keys
[batch, heads, kv, memory_length] (KEY_LETTERS) and values [batch, heads, memory_length, kv]
(VALUE_LETTERS):
    one entry per slot      global attention and gau (gau has one head), never wrapping
    a ring of `window`      local attention: slot s at entry s % window, so that a step reads
                            only the keys it can see

New positions attend to two parts (`KeyValues`, `view`): the cache as it is, and their own keys
and values; then `store` writes them for the steps after, in place. (Reading the cache after
writing into it made XLA:CPU copy every layer's cache twice a step: at 125M and 160 slots 4 of
26 ms a token, and more as the cache grows.) The orders are those of the step's two products,
scores = q @ keys and out = probabilities @ values, each [rows, contracted] @ [contracted,
columns] per (batch, head): in another order XLA:CPU copies a transposed cache every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.kernels import ordered_after

KEY_LETTERS = "bhkm"
VALUE_LETTERS = "bhmk"
DIMENSION_NAMES = {"b": "batch", "h": "heads", "m": "memory_length", "k": "kv"}


class KeyValues(NamedTuple):
    """Keys and values that queries attend to, with the einsum letters of their orders (`m` the
    memory_length, `k` the key or value size; without `b`, the same for every row), and mask
    [batch or 1, sequence, memory_length]: which of them each query sees."""

    keys: jax.Array
    values: jax.Array | None
    mask: jax.Array
    key_letters: str = "bmhk"
    value_letters: str = "bmhk"


def one_head(part: KeyValues) -> KeyValues:
    """A part of a single head's keys and values (gau's) without its heads dimension."""
    def squeezed(array, letters):
        return jnp.squeeze(array, letters.index("h")), letters.replace("h", "")

    (keys, key_letters), (values, value_letters) = squeezed(part.keys, part.key_letters), \
        squeezed(part.values, part.value_letters)
    return KeyValues(keys, values, part.mask, key_letters, value_letters)


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
          names=DIMENSION_NAMES) -> dict:
    """A layer's empty cache: keys [batch, heads, size, entries] and values [batch, heads, entries,
    size], `entries` the slots, or a ring of `window` entries when that is shorter. `names` maps
    the letters to the layout's dimension names (gau: one head, and its own key size)."""
    length = cache_slots if window is None else min(window, cache_slots)
    sizes = {"b": batch, "h": heads, "m": length, "k": size}
    return {name: _constrained(jnp.zeros([sizes[letter] for letter in letters], dtype), letters, layout, names)
            for name, letters in (("k", KEY_LETTERS), ("v", VALUE_LETTERS))}


def view(k, v, slots, first_slot, layer_cache, window: int | None) -> list[KeyValues]:
    """What new positions attend to: k, v [batch, sequence, heads, kv] at `slots` [sequence]
    (consecutive, the same for every row) -> the KeyValues of the cache as it is, and their own."""
    length = layer_cache["v"].shape[2]
    entry = jnp.arange(length)
    # the slot each entry holds before these positions are written (negative: none yet)
    cached_slots = _ring_slots(slots[0], length) if _is_ring(length, window) else jnp.where(entry < slots[0], entry, -1)

    def seen(key_slots):
        return visible(slots, key_slots, window)[None] & (key_slots >= first_slot[:, None])[:, None, :]

    return [KeyValues(layer_cache["k"], layer_cache["v"], seen(cached_slots), KEY_LETTERS, VALUE_LETTERS),
            KeyValues(k, v, seen(slots))]


def store(k, v, slots, layer_cache, window: int | None, layout, after, names=DIMENSION_NAMES) -> dict:
    """The cache with k, v [batch, sequence, heads, kv] of `slots` written, once `after` (the
    attention that read the cache, shaped as k) is computed: a write that does not depend on the
    reads of the cache it overwrites makes XLA copy the cache first (kernels.ordered_after)."""
    length = layer_cache["v"].shape[2]
    write = _write_ring if _is_ring(length, window) else _write
    letters = {"k": KEY_LETTERS, "v": VALUE_LETTERS}
    return {name: _constrained(write(layer_cache[name], jnp.einsum(f"bmhk->{letters[name]}", ordered_after(new, after)),
                                     slots[0], letters[name].index("m")), letters[name], layout, names)
            for name, new in (("k", k), ("v", v))}


def _is_ring(length: int, window: int | None) -> bool:
    return window is not None and length >= window


def _write(cache, new, first, axis: int):
    """cache with `new` written at entries first, first+1, ... along `axis` (memory_length)."""
    start = [0] * cache.ndim
    start[axis] = first
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


def _write_ring(ring, new, first_slot, axis: int):
    """The ring with new entries (along `axis`) of slots first_slot.. written at slot % length."""
    length, count = ring.shape[axis], new.shape[axis]
    if count >= length:  # only the last `length` new entries stay
        new = jax.lax.slice_in_dim(new, count - length, count, axis=axis)
        first_slot, count = first_slot + count - length, length
    new = new.astype(ring.dtype)
    if count == 1:
        return _write(ring, new, first_slot % length, axis)
    index = [slice(None)] * ring.ndim
    index[axis] = (first_slot + jnp.arange(count)) % length
    return ring.at[tuple(index)].set(new)


def _ring_slots(next_slot, length: int):
    """The slot each ring entry holds once slots < next_slot are written: the newest slot
    congruent to the entry's index (negative: not written yet, masked as padding is)."""
    index = jnp.arange(length)
    return next_slot - 1 - jnp.mod(next_slot - 1 - index, length)


def _constrained(array, letters: str, layout, names):
    return array if layout is None else layout.constrain(array, tuple(names[letter] for letter in letters))
