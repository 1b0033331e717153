"""Linear attention, GPT-Neo's `linear` kind (Efficient Attention, arXiv 1812.01243).

The same q, k, v and output projections as softmax attention (rotary, if on, already applied to
q and k). Per head, with d = kv:

    causal (language modelling)
        phi_q[t] = softmax over kv of q[t]          phi_k[s] = exp(k[s])
        out[t]   = (phi_q[t] . S[t]) / (phi_q[t] . z[t] + 1e-6)
        S[t]     = sum_{s <= t} phi_k[s] (x) v[s]   [kv, kv]
        z[t]     = sum_{s <= t} phi_k[s]            [kv]
    (GPT-Neo adds 1e-6 to every element of z; phi_q sums to 1, so that is 1e-6 after the dot.)

    non-causal (the masked-LM objective)
        phi_q[t] = softmax over kv of q[t]          phi_k = softmax over the sequence of k
        out[t]   = phi_q[t] . sum_s phi_k[s] (x) v[s]

exp(k) overflows for large keys. Here the sums are held scaled by exp(-m), m = max(0, the largest
key of the head so far), and the 1e-6 becomes 1e-6 * exp(-m): numerator and denominator are
scaled alike, so the function is the same, and m = 0 (keys all below 0) is GPT-Neo's arithmetic.
(GPT-Neo's exp(k) overflows to NaN once a key passes 88; here only a query whose every visible key
is about 87 below the largest key of its chunk loses its output, to 0.)

A whole sequence is computed in chunks of LINEAR_CHUNK positions, each with its own m (the
largest key up to its end): within a chunk, the masked [chunk, chunk] products phi_q . phi_k;
across chunks, the running S and z at each chunk's start (a parallel prefix sum). Nothing of
size [sequence, kv, kv] is ever held: the largest temporaries are S at each chunk's start,
[batch, sequence / LINEAR_CHUNK, heads, kv, kv].

Decoding keeps (S, z, m) per layer and adds each new position to it: O(1) work per new token
whatever its position. The state, in float32 whatever the compute dtype:
    S [batch, heads, kv, kv]   z [batch, heads, kv]   m [batch, heads]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LINEAR_CHUNK = 64
DENOMINATOR_EPSILON = 1e-6  # GPT-Neo's
STATE_DIMENSIONS = {"S": ("batch", "heads", "kv", None), "z": ("batch", "heads", "kv"), "m": ("batch", "heads")}


def empty_state(config, batch: int, layout) -> dict:
    return constrained_state(empty_state_like(batch, config.n_head, config.head_dim), layout)


def constrained_state(state: dict, layout) -> dict:
    if layout is None:
        return state
    return {name: layout.constrain(value, STATE_DIMENSIONS[name]) for name, value in state.items()}


def causal_linear_attention(q, k, v, state=None, key_valid=None):
    """q, k, v [batch, sequence, heads, kv] -> (out [batch, sequence, heads, kv] in v's dtype, the
    state after the last position). `state` (from `empty_state` or an earlier call) holds the
    positions before these; `key_valid` [batch, sequence] False where a key is padding (it then
    adds nothing to S and z)."""
    batch, length, heads, d = q.shape
    if state is None:
        state = empty_state_like(batch, heads, d)
    chunk = min(LINEAR_CHUNK, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length  # padding after the last position: no real query sees it

    def chunked(x):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(batch, chunks, chunk, heads, d)

    phi_q = chunked(jax.nn.softmax(q.astype(jnp.float32), axis=-1))
    k, v = chunked(k), chunked(v)
    if key_valid is not None:
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad))).reshape(batch, chunks, chunk)[..., None, None]
    # m of a chunk: the largest key up to its end (never below 0 or the state's m), [batch, chunks, heads]
    m = jnp.maximum(jax.lax.cummax(jax.lax.stop_gradient(k).max(axis=(2, 4)), axis=1), state["m"][:, None])
    phi_k = jnp.exp(k - m[:, :, None, :, None])
    if key_valid is not None:
        phi_k = jnp.where(key_valid, phi_k, 0.0)

    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    within = jnp.where(causal, jnp.einsum("bnchd,bnthd->bnhct", phi_q, phi_k), 0.0)
    numerator = jnp.einsum("bnhct,bnthe->bnche", within, v)
    denominator = jnp.einsum("bnhct->bnch", within)
    # each chunk's sums in its own m, then running sums over [the state, chunk 0, chunk 1, ...]
    sums = {"m": m, "S": jnp.einsum("bnthd,bnthe->bnhde", phi_k, v), "z": jnp.einsum("bnthd->bnhd", phi_k)}
    running = jax.lax.associative_scan(_add_sums, jax.tree.map(
        lambda start, part: jnp.concatenate([start[:, None], part], axis=1), state, sums), axis=1)
    before = jax.tree.map(lambda x: x[:, :-1], running)  # the sums before each chunk, in the previous m
    rescale = jnp.exp(before["m"] - m)
    S_before, z_before = before["S"] * rescale[..., None, None], before["z"] * rescale[..., None]
    numerator += jnp.einsum("bnchd,bnhde->bnche", phi_q, S_before)
    denominator += jnp.einsum("bnchd,bnhd->bnch", phi_q, z_before)
    epsilon = DENOMINATOR_EPSILON * jnp.exp(-m)[:, :, None, :]
    # a query whose every key is ~87 below its chunk's m underflows to 0 / 0: make that 0, not NaN
    out = numerator / jnp.maximum(denominator + epsilon, jnp.finfo(jnp.float32).tiny)[..., None]
    out = out.reshape(batch, chunks * chunk, heads, d)[:, :length]
    return out.astype(v.dtype), jax.tree.map(lambda x: x[:, -1], running)


def _add_sums(earlier, later):
    """Sums over two consecutive spans, each scaled by exp(-its m): the total, in the later span's
    m (the larger: m only grows along a sequence, so the earlier sums shrink and cannot overflow)."""
    rescale = jnp.exp(earlier["m"] - later["m"])
    return {"m": later["m"], "S": earlier["S"] * rescale[..., None, None] + later["S"],
            "z": earlier["z"] * rescale[..., None] + later["z"]}


def empty_state_like(batch: int, heads: int, d: int) -> dict:
    return {"S": jnp.zeros((batch, heads, d, d), jnp.float32), "z": jnp.zeros((batch, heads, d), jnp.float32),
            "m": jnp.zeros((batch, heads), jnp.float32)}


def noncausal_linear_attention(q, k, v):
    """q, k, v [batch, sequence, heads, kv] -> [batch, sequence, heads, kv]: every query sees
    every position (the masked-LM form); no denominator, as the paper's normalised phi_k needs none."""
    phi_q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    phi_k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bshd,bshe->bhde", phi_k, v.astype(jnp.float32))
    return jnp.einsum("bshd,bhde->bshe", phi_q, context).astype(v.dtype)
