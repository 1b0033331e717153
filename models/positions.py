"""Where a token is: the learned position table GPT-Neo adds to the token embedding.

`positions` [batch, sequence] are each token's position in its own text. They differ from the
slots of a decoding cache (see models/attention.py) when a prompt is left-padded: the first
real token of every row is at position 0, whatever its slot.
"""

from __future__ import annotations

from models.params import Weight


def position_weights(config) -> dict[str, Weight]:
    return {"wpe": Weight(("embed_sequence", "embd"), 0.01)}


def embed_positions(p, positions):
    """positions [batch, sequence] -> [batch, sequence, embd]."""
    return p["wpe"][positions]
