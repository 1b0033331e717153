"""GPT-Neo's model: token + learned position embeddings, pre-LN blocks with per-layer attention
kinds, an MLP, a final LayerNorm, and the token embedding tied as the output projection.

Parameters are a plain pytree of float32 arrays; `weights(config)` is the one description of
it, giving every parameter's dimension names and init. Read top to bottom: `weights`, then
`forward`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from models.layers import (
    Weight,
    attention,
    attention_weights,
    dropout,
    layer_norm,
    layer_norm_weights,
    materialise_gradient,
    mlp,
    mlp_weights,
)


def weights(config) -> dict:
    """The parameter tree, each leaf a `Weight` with its dimension names and init."""
    blocks = []
    for kind in config.layer_kinds:
        block = {"ln_2": layer_norm_weights(), "mlp": mlp_weights(config)}
        if kind != "none":  # a `none` layer has no attention at all
            block |= {"ln_1": layer_norm_weights(), "attn": attention_weights(config)}
        blocks.append(block)
    return {
        "wte": Weight(("vocab", "embd"), 0.02),
        "wpe": Weight(("embed_sequence", "embd"), 0.01),
        "blocks": blocks,
        "ln_f": layer_norm_weights(),
    }


def is_weight(node) -> bool:
    return isinstance(node, Weight)


def shape_of(weight: Weight, config) -> tuple[int, ...]:
    sizes = config.dim_sizes
    return tuple(sizes[dim] for dim in weight.dims)


def parameter_count(config, matmul_only: bool = False) -> int:
    """All parameters, or only those used in a matrix multiply (not the position table, a lookup;
    the tied token embedding counts, as the output projection)."""
    return sum(
        math.prod(shape_of(w, config))
        for w in jax.tree.leaves(weights(config), is_leaf=is_weight)
        if not matmul_only or (len(w.dims) >= 2 and w.dims[0] != "embed_sequence")
    )


def param_shapes(config):
    """The parameter tree as jax.ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def init_params(config, rng: jax.Array, shardings=None) -> dict:
    """Random float32 parameters; with `shardings` (a tree like the parameters') each device makes
    only its own shard. The values do not depend on the shardings."""
    leaves, treedef = jax.tree.flatten(weights(config), is_leaf=is_weight)
    keys = jax.random.split(rng, len(leaves))
    placements = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    return treedef.unflatten([
        _initial_weight(key, shape_of(weight, config), weight.init, placement)
        for weight, key, placement in zip(leaves, keys, placements)
    ])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _initial_weight(key, shape: tuple, init, sharding):
    """One weight. A program per (shape, init, sharding), reused by every layer: one program for
    the whole tree took a GPU two minutes to compile (a kernel per weight), this takes seconds."""
    if init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = init * jax.random.normal(key, shape, jnp.float32)
    return value if sharding is None else jax.lax.with_sharding_constraint(value, sharding)


def compute_dtype(config):
    return jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32


def block(p, x, kind: str, config, layout, dropout_rng):
    """One pre-LN block: x += attn(LN(x)); x += mlp(LN(x))."""
    attn_rng, res_rng_1, res_rng_2 = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None,) * 3
    if kind != "none":
        a = attention(p["attn"], layer_norm(p["ln_1"], x, config.layer_norm_epsilon), kind, config, layout, attn_rng)
        if res_rng_1 is not None and config.res_dropout > 0:
            a = dropout(res_rng_1, a, config.res_dropout)
        x = x + a
    m = mlp(p["mlp"], layer_norm(p["ln_2"], x, config.layer_norm_epsilon), config, layout)
    if res_rng_2 is not None and config.res_dropout > 0:
        m = dropout(res_rng_2, m, config.res_dropout)
    x = x + m
    if layout is not None:
        x = layout.constrain(x, ("batch", "sequence", "embd"))
    return x


def forward(params, tokens, config, layout=None, dropout_rng=None):
    """tokens [batch, sequence] -> final hidden states [batch, sequence, embd] (after ln_f).

    dropout_rng None means no dropout (evaluation and sampling).
    """
    p = jax.tree.map(lambda w: w.astype(compute_dtype(config)), params)
    x = p["wte"][tokens] + p["wpe"][: tokens.shape[1]]
    if layout is not None:
        x = layout.constrain(x, ("batch", "sequence", "embd"))
    if dropout_rng is not None and config.embed_dropout > 0:
        x = dropout(jax.random.fold_in(dropout_rng, config.n_layer), x, config.embed_dropout)
    for layer, (kind, block_params) in enumerate(zip(config.layer_kinds, p["blocks"])):
        layer_fn = functools.partial(block, kind=kind, config=config, layout=layout)
        if config.recompute_grad:
            layer_fn = jax.checkpoint(layer_fn)
        layer_rng = jax.random.fold_in(dropout_rng, layer) if dropout_rng is not None else None
        x = materialise_gradient(layer_fn(block_params, x, dropout_rng=layer_rng))
    return layer_norm(p["ln_f"], x, config.layer_norm_epsilon)


def output_embedding(params):
    """[vocab, embd]: the tied token embedding projects hidden states to logits."""
    return params["wte"]


def logits(params, tokens, config, layout=None):
    """tokens [batch, sequence] -> float32 logits [batch, sequence, vocab] (no dropout)."""
    hidden = forward(params, tokens, config, layout)
    return jnp.einsum("bse,ve->bsv", hidden, output_embedding(params).astype(hidden.dtype)).astype(jnp.float32)
