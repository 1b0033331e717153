"""A mixture-of-experts layer: the MLP of the layers listed in `moe_layers` (GPT-Neo's MoE, with
mesh-tensorflow 0.1.18's routing; the settings are `moe_params`, configs.MOE_PARAMS).

A layer's tokens are routed in groups. A group is a run of up to `moe_group_size` consecutive
positions of one row (dimensions `groups` and `group_tokens`): a row's routing then never depends
on which rows share its batch, so microbatching, the eval batch size and the mesh leave it as it
is. Within a group each expert takes at most `expert_capacity` tokens,

    C = max(min(S, int(S * capacity_factor / E)), moe_min_expert_capacity)   (S tokens, E experts)

The router (float32 logits x . router, softmax over experts) sends a token to its best expert, and
under top_2 also to its second best, the two gates renormalised to sum to 1; the second expert is
kept by `moe_second_policy`. Every token's first choice takes a capacity slot before any second
choice does, each in position order; a choice past capacity is dropped (a token that keeps no
expert adds nothing: the residual passes it on). While decoding with a cache (prefill and every
new token) capacity is unbounded, so a prompt's outputs do not depend on how it was split.

Tokens reach their experts through the `dispatch` one-hot [.. group_tokens, experts,
expert_capacity] and come back weighted by `combine`. The `experts` dimension may be sharded by
the layout (expert parallelism): each device holds its experts' weights and computes only their
slots. When `experts` shares its mesh axis with `batch`, the expert-side tensors hold every
group (the batch dimension is whole there), which XLA reaches with an all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.activations import ACTIVATIONS
from models.dropout import dropout
from models.params import Weight

# `moe_activation` may name "linear" as mesh-tensorflow's product layers did: the identity
EXPERT_ACTIVATIONS = {**ACTIVATIONS, "linear": ACTIVATIONS["id"]}
SECOND_POLICIES = ("all", "none", "threshold", "random")


def expert_activations(config) -> list[str]:
    """moe_activation as a list: "relu" -> ["relu"]; GPT-Neo's list form ["gelu", "linear"] makes a
    gated expert, one input projection per entry, their activations multiplied (GEGLU here)."""
    names = config.moe_activation
    return [names] if isinstance(names, str) else list(names)


def moe_weights(config) -> dict:
    """router [embd, experts]; per activation an input projection wi [experts, embd, expert_hidden];
    wo [experts, expert_hidden, embd]. No biases; truncated-normal init with std 1/sqrt(fan_in)."""
    moe = config.moe
    return {
        "router": Weight(("embd", "experts"), config.n_embd ** -0.5, truncated=True),
        "wi": [Weight(("experts", "embd", "expert_hidden"), config.n_embd ** -0.5, truncated=True)
               for _ in expert_activations(config)],
        "wo": Weight(("experts", "expert_hidden", "embd"), moe.hidden_size ** -0.5, truncated=True),
    }


def group_tokens(sequence: int, group_size: int) -> int:
    """Tokens per group: the largest divisor of the row's length that is at most group_size."""
    return max(t for t in range(1, min(sequence, group_size) + 1) if sequence % t == 0)


def expert_capacity(tokens: int, experts: int, capacity_factor: float, min_capacity: int) -> int:
    return max(min(tokens, int(tokens * capacity_factor / experts)), min_capacity)


def route(logits, capacity: int, config, training: bool, rng=None):
    """float32 router logits [..., group_tokens, experts] -> (dispatch, combine, aux_loss, stats).

    dispatch and combine are [..., group_tokens, experts, expert_capacity]: dispatch 1 where a token
    holds a slot of an expert, combine that slot's gate. aux_loss is the load-balancing loss
    (moe_loss_coef * E^2 * mean over groups and experts of the fraction of tokens whose first
    choice is the expert times its mean router probability), taken before capacity. stats: the
    fraction of tokens dropped (kept by no expert) and the busiest expert's load (the choices it
    received, before capacity, over the mean per expert: 1 is balanced, E all on one), as means over
    the groups."""
    moe = config.moe
    experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    first = jax.nn.one_hot(jnp.argmax(probs, axis=-1), experts, dtype=jnp.float32)
    gate_1 = jnp.sum(probs * first, axis=-1)
    balance = experts**2 * jnp.mean(jnp.mean(first, axis=-2) * jnp.mean(probs, axis=-2))
    aux_loss = moe.loss_coef * balance

    if moe.gating == "top_2":
        second = jax.nn.one_hot(jnp.argmax(probs * (1.0 - first), axis=-1), experts, dtype=jnp.float32)
        gate_2 = jnp.sum(probs * second, axis=-1)
        total = gate_1 + gate_2 + 1e-9
        gate_1, gate_2 = gate_1 / total, gate_2 / total
        policy, threshold = ((moe.second_policy_train, moe.second_threshold_train) if training
                             else (moe.second_policy_eval, moe.second_threshold_eval))
        if policy == "random" and not training:
            policy = "threshold"  # evaluation and decoding are deterministic
        if policy == "none":
            keep_second = jnp.zeros_like(gate_2)
        elif policy == "threshold":
            keep_second = (gate_2 > threshold).astype(jnp.float32)
        elif policy == "random":
            draw = jax.random.uniform(rng, gate_2.shape)
            keep_second = (draw < gate_2 / max(threshold, 1e-9)).astype(jnp.float32)
        else:
            keep_second = jnp.ones_like(gate_2)
        second = second * keep_second[..., None]
    else:
        second = jnp.zeros_like(first)
        gate_2 = jnp.zeros_like(gate_1)

    def slots(choice, taken):
        """Each chosen token's slot at its expert (position order, after `taken` slots) and whether
        the slot is within capacity; both [..., group_tokens, experts]."""
        slot = jnp.cumsum(choice, axis=-2) - choice + taken[..., None, :]
        return slot, choice * (slot < capacity)

    slot_1, kept_1 = slots(first, jnp.zeros(first.shape[:-2] + (experts,), jnp.float32))
    slot_2, kept_2 = slots(second, jnp.sum(kept_1, axis=-2))

    def placed(slot, kept):
        index = jnp.sum(slot * kept, axis=-1).astype(jnp.int32)
        return kept[..., None] * jax.nn.one_hot(index, capacity, dtype=jnp.float32)[..., None, :]

    place_1, place_2 = placed(slot_1, kept_1), placed(slot_2, kept_2)
    dispatch = place_1 + place_2
    combine = gate_1[..., None, None] * place_1 + gate_2[..., None, None] * place_2
    reached = jnp.sum(kept_1 + kept_2, axis=-1) > 0
    chosen = jnp.sum(first + second, axis=-2)  # [..., experts]
    stats = {
        "dropped": 1.0 - jnp.mean(reached.astype(jnp.float32)),
        "max_load": jnp.mean(jnp.max(chosen, axis=-1) / jnp.maximum(jnp.mean(chosen, axis=-1), 1e-9)),
    }
    return dispatch, combine, aux_loss, stats


def expert_side_dims(layout) -> tuple:
    """The dimensions of the expert-side tensors [experts, batch, groups, expert_capacity, embd or
    expert_hidden]: `batch` stays whole where it shares its mesh axis with `experts`."""
    shared = layout is not None and layout.layout.get("batch") is not None and \
        layout.layout.get("batch") == layout.layout.get("experts")
    return ("experts", None if shared else "batch", "groups", "expert_capacity")


def moe(p, x, config, layout, training: bool, rng=None, decoding: bool = False):
    """x [batch, sequence, embd] -> (y [batch, sequence, embd], aux_loss, stats) (see `route`)."""
    moe = config.moe
    batch, sequence, embd = x.shape
    tokens = sequence if decoding else group_tokens(sequence, moe.group_size)
    factor = moe.capacity_factor_train if training else moe.capacity_factor_eval
    capacity = tokens if decoding else expert_capacity(tokens, moe.num_experts, factor, moe.min_expert_capacity)
    grouped = x.reshape(batch, sequence // tokens, tokens, embd)
    route_rng, dropout_rng = jax.random.split(rng) if rng is not None else (None, None)
    logits = jnp.einsum("bote,ex->botx", grouped.astype(jnp.float32), p["router"].astype(jnp.float32))
    dispatch, combine, aux_loss, stats = route(logits, capacity, config, training, route_rng)

    side = expert_side_dims(layout)

    def constrain(t, last):
        return t if layout is None else layout.constrain(t, (*side, last))

    expert_in = constrain(jnp.einsum("botxz,bote->xboze", dispatch.astype(x.dtype), grouped), "embd")
    hidden = None
    for name, wi in zip(expert_activations(config), p["wi"]):
        h = EXPERT_ACTIVATIONS[name](constrain(jnp.einsum("xboze,xej->xbozj", expert_in, wi), "expert_hidden"))
        hidden = h if hidden is None else hidden * h
    if training and moe.dropout_rate > 0:
        hidden = dropout(dropout_rng, hidden, moe.dropout_rate)
    expert_out = constrain(jnp.einsum("xbozj,xje->xboze", hidden, p["wo"]), "embd")
    y = jnp.einsum("botxz,xboze->bote", combine.astype(x.dtype), expert_out).reshape(batch, sequence, embd)
    if layout is not None:
        y = layout.constrain_letters(y, "bse")
    return y, aux_loss, stats
