"""Where a token is: GPT-Neo's position encodings.

    learned (default)  a table wpe [embed_sequence, embd] added to the token embedding
    axial_pos_emb      [a1, a2], a1 * a2 = n_ctx: two tables, wpe_rows [axial_rows, embd] and
                       wpe_columns [axial_columns, embd]; position i * a2 + j adds the mean of
                       row i and column j (a1 + a2 rows stand for a1 * a2)
    rotary_emb         no table: attention rotates q and k by angles proportional to the position
                       (`rotate`, called by every softmax attention kind)

`positions` [batch, sequence] are each token's position in its own text. They differ from the
slots of a decoding cache (see models/attention.py) when a prompt is left-padded: the first
real token of every row is at position 0, whatever its slot.
"""

from __future__ import annotations

import jax.numpy as jnp

from models.params import Weight

ROTARY_BASE = 10000.0
POSITION_TABLE_DIMENSIONS = ("embed_sequence", "axial_rows", "axial_columns")  # rows looked up, never multiplied


def position_weights(config) -> dict[str, Weight]:
    if config.rotary_emb:  # GPT-Neo's rule: rotary wins over axial_pos_emb
        return {}
    if config.axial_pos_emb:
        return {"wpe_rows": Weight(("axial_rows", "embd"), 0.01), "wpe_columns": Weight(("axial_columns", "embd"), 0.01)}
    return {"wpe": Weight(("embed_sequence", "embd"), 0.01)}


def embed_positions(p, positions, config):
    """positions [batch, sequence] -> the position term [batch, sequence, embd] added to the token
    embedding, or None where positions enter through attention instead (rotary)."""
    if config.rotary_emb:
        return None
    if config.axial_pos_emb:
        columns = config.axial_pos_emb[1]
        return (p["wpe_rows"][positions // columns] + p["wpe_columns"][positions % columns]) / 2
    return p["wpe"][positions]


# --- rotary -----------------------------------------------------------------------------------


def rotary_angles(positions, head_dim: int):
    """positions [batch, sequence] -> float32 angles [batch, sequence, kv]: position times
    ROTARY_BASE^(-2i/kv) for i < kv/2, the half repeated ("rotate half" layout). Float32 even under
    bfloat16 compute: bfloat16 holds integers exactly only up to 256, so later positions would
    share angles."""
    inv_freq = ROTARY_BASE ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([angles, angles], axis=-1)


def rotate(x, positions, layout=None, letters: str = "bshk"):
    """x [batch, sequence, heads, kv] (queries; keys: letters "bmhk") at positions [batch, sequence]
    -> x with each pair (x[i], x[i + kv/2]) rotated by its angle, computed in float32 and returned
    in x's dtype."""
    angles = rotary_angles(positions, x.shape[-1])[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    out = (x32 * jnp.cos(angles) + rotated_half * jnp.sin(angles)).astype(x.dtype)
    return out if layout is None else layout.constrain_letters(out, letters)
