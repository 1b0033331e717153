"""GAU, the `gau` attention kind: a single-head gated attention unit, in misaka-v3's form (the
GAU paper's unit without its shared scale-offset, ReLU instead of swish). With s = gau_key_size
and e = gau_expanded_size, for the queries t of a sequence x [sequence, embd]:

    q = relu(x Wq), k = relu(x Wk), v = relu(x Wv)         [sequence, s]  (each its own projection)
    u = relu(x Wu)                                         [sequence, e]  (the gate)
    A[t, j] = relu(q[t] . k[j] / sqrt(s))^2 / n(t)         for every key j visible to t, else 0
    out = ((A v) W * u) Wo + bo                            W [s, e], Wo [e, embd]

n(t) is the number of keys t sees (t + 1 in a sequence from position 0: causal, as global
attention; with mlm_training every position, so n(t) is the sequence length). With rotary_emb, q and k are rotated by their positions after the ReLU. No biases but
the output's; no attention dropout (attn_dropout is global attention's). Decoding keeps k and v
per slot, as global attention does (models/kv_cache.py), with one head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mesh import einsum
from models import kv_cache
from models.kernels import project
from models.params import Weight, bias, projection_std
from models.positions import rotate

# the cache's letters (models/kv_cache.py) named for gau: one head, whose entry stays whole
CACHE_NAMES = {"b": "batch", "h": None, "m": "memory_length", "k": "gau_key"}


def gau_weights(config) -> dict[str, Weight]:
    embd_std = projection_std(config, config.n_embd)
    return {
        "gau_q": Weight(("embd", "gau_key"), embd_std),
        "gau_k": Weight(("embd", "gau_key"), embd_std),
        "gau_v": Weight(("embd", "gau_key"), embd_std),
        "gau_u": Weight(("embd", "gau_expanded"), embd_std),
        "gau_w": Weight(("gau_key", "gau_expanded"), projection_std(config, config.gau_key_size)),
        "gau_out": Weight(("gau_expanded", "embd"),
                          projection_std(config, config.gau_expanded, residual_output=True)),
        "gau_out_bias": bias(("embd",)),
    }


def gau_apply(p, x, slots, first_slot, layer_cache, config, layout, rng, positions=None):
    """x [batch, sequence, embd] at `slots` -> ([batch, sequence, embd], layer_cache)."""
    q, k, v = (jax.nn.relu(project("bse,eg->bsg", x, p[name], config, layout)) for name in ("gau_q", "gau_k", "gau_v"))
    u = jax.nn.relu(project("bse,eu->bsu", x, p["gau_u"], config, layout))
    if config.rotary_emb:
        if positions is None:
            positions = jnp.broadcast_to(slots, x.shape[:2])
        q, k = (rotate(t[:, :, None, :], positions)[:, :, 0, :] for t in (q, k))
    if layer_cache is None:
        parts = [kv_cache.KeyValues(k, v, kv_cache.visible(slots, slots, None, causal=not config.mlm_training)[None],
                                    "bmk", "bmk")]
    else:  # the cache before these positions and their own keys and values (models/kv_cache.py)
        parts = [kv_cache.one_head(part) for part in
                 kv_cache.view(k[:, :, None, :], v[:, :, None, :], slots, first_slot, layer_cache, None)]
    # n(t): the keys query t sees in all the parts together (a padding slot's query sees none)
    seen = jnp.maximum(sum(jnp.broadcast_to(part.mask, (x.shape[0], *part.mask.shape[1:])).sum(-1, keepdims=True)
                           for part in parts), 1)
    attended = 0.0
    for part in parts:
        scores = einsum(f"bsk,{part.key_letters}->bsm", q.astype(jnp.float32), part.keys.astype(jnp.float32))
        weights = jnp.where(part.mask, jnp.square(jax.nn.relu(scores / math.sqrt(config.gau_key_size))), 0.0) / seen
        attended = attended + einsum(f"bsm,{part.value_letters}->bsk", weights.astype(part.values.dtype), part.values,
                                     layout=layout)
    if layer_cache is not None:
        layer_cache = kv_cache.store(k[:, :, None, :], v[:, :, None, :], slots, layer_cache, None, layout,
                                     after=attended[:, :, None, :], names=CACHE_NAMES)
    gated = project("bsg,gu->bsu", attended, p["gau_w"], config, layout) * u
    return project("bsu,ue->bse", gated, p["gau_out"], config, layout) + p["gau_out_bias"], layer_cache


def gau_cache(config, batch: int, cache_slots: int, dtype, layout):
    return kv_cache.empty(batch, 1, cache_slots, None, config.gau_key_size, dtype, layout, CACHE_NAMES)


def gau_flops(config) -> float:
    """Training FLOPs per token beyond the projections: q.k and A.v over (n_ctx + 1) / 2 keys on
    average (n_ctx with mlm_training), each 2 * s, forward and backward (x3)."""
    keys = config.n_ctx if config.mlm_training else (config.n_ctx + 1) / 2
    return 12 * config.gau_key_size * keys
