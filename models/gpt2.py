"""GPT-Neo's model, one forward for training, evaluation, prefill and decoding.

Token embedding plus positions (models/positions.py); pre-LN blocks, each with its layer's attention kind
(models/attention.py: global, local, linear, gau or none) and an MLP (models/mlp.py), or in the layers of
moe_layers a mixture of experts (models/moe.py); a final LayerNorm; the output projection `unembed`: the token
embedding tied, or with no_weight_tie a separate biased lm_head. Read top to bottom: `weights`,
`embed`, `block`, `forward`, `unembed`, `logits`.

Parameters are a plain pytree of float32 arrays, described once by `weights(config)`: every
leaf a `Weight` with its dimension names, init and weight-decay flag (models/params.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from models import kernels, lora, params
from models.attention import KINDS
from models.dropout import dropout
from models.kernels import project
from models.mlp import mlp, mlp_weights
from models.moe import moe, moe_weights
from models.norms import layer_norm, layer_norm_weights, prenorm, prenorm_weights, rezero_gain
from models.params import Weight, bias, is_weight, shape_of
from models.positions import POSITION_TABLE_DIMENSIONS, embed_positions, position_weights

__all__ = ["Weight", "is_weight", "shape_of"]

# leading dimensions of weights no token multiplies by
NOT_PROJECTIONS = (*POSITION_TABLE_DIMENSIONS, "mem_kv", "virtual_tokens", "prefix_hidden")


# --- weights ----------------------------------------------------------------------------------


def weights(config) -> dict:
    """The parameter tree, each leaf a `Weight`; with fine-tuning, the adapters too (models/lora.py)."""
    return lora.with_adapters({
        "wte": Weight(("vocab", "embd"), 0.02),
        **position_weights(config),
        "blocks": [block_weights(config.layer_kinds, range(config.n_layer), config)] if config.share_parameters else
                  [block_weights([kind], [layer], config) for layer, kind in enumerate(config.layer_kinds)],
        "ln_f": layer_norm_weights(config),
        **output_projection_weights(config),
    }, config)


def output_projection_weights(config) -> dict:
    """Without weight tying, lm_head: [vocab, embd] as the token embedding is (so that `unembed`
    treats both alike) and a bias. GPT-Neo dropped ln_f on this path; neomesh keeps it."""
    if not config.no_weight_tie:
        return {}
    return {"lm_head": {"w": Weight(("vocab", "embd"), 0.02), "bias": bias(("vocab",))}}


def block_weights(kinds: list[str], layers, config) -> dict:
    """The weights of a block that serves these layers, of these attention kinds: one layer's, or
    with share_parameters every layer's (ALBERT-style: global and local layers share one
    attention's weights, a `none` layer uses only the MLP's and its norm; MoE layers share one
    mixture of experts, `moe`, and the others one MLP)."""
    moe_layers = [config.is_moe_layer(layer) for layer in layers]
    block = {"ln_2": prenorm_weights(config), "rezero_2": rezero_gain()}
    if not all(moe_layers):
        block["mlp"] = mlp_weights(config)
    if any(moe_layers):
        block["moe"] = moe_weights(config)
    if config.macaron:
        block["mlp_macaron"] = mlp_weights(config)
    attention = {}
    for kind in dict.fromkeys(kinds):
        attention |= KINDS[kind].weights(config)
    if attention:  # a `none` layer has no attention at all
        block |= {"ln_1": prenorm_weights(config), "attn": attention, "rezero_1": rezero_gain()}
    if not config.rezero:
        block = {name: w for name, w in block.items() if not name.startswith("rezero_")}
    return {name: w for name, w in block.items() if w is not None}


def init_params(config, rng: jax.Array, shardings=None) -> dict:
    """Random float32 parameters; with `shardings` each device makes only its own shard."""
    return params.initialise(weights(config), config, rng, shardings)


def param_shapes(config):
    """The parameter tree as jax.ShapeDtypeStructs, without allocating anything."""
    return jax.tree.map(lambda w: jax.ShapeDtypeStruct(shape_of(w, config), jnp.float32), weights(config),
                        is_leaf=is_weight)


def parameter_count(config, matmul_only: bool = False, experts: bool | None = None) -> int:
    """All parameters, or those a token meets in matrix multiplies, each as often as it meets it: a
    shared block once per layer, with only what that layer's kind uses; not the position tables,
    lookups, nor memory key/values (attention's FLOPs count them); the tied token embedding, as the
    output projection (an untied one is a lookup); of a mixture of experts' weights, the share a
    token reaches (top_2: 2 of E experts), so that MFU counts active parameters. `experts` True
    counts only the experts' own weights (models/moe.py: those with a leading `experts`
    dimension), False only the rest."""
    tree = weights(config)
    if matmul_only:
        tree["blocks"] = lora.with_adapters(
            {"blocks": [block_weights([kind], [layer], config) for layer, kind in enumerate(config.layer_kinds)]},
            config)["blocks"]
        if config.no_weight_tie:
            tree = {name: w for name, w in tree.items() if name != "wte"}
    reached = (2 if config.moe.gating == "top_2" else 1) / config.moe.num_experts
    total = 0.0
    for w in jax.tree.leaves(tree, is_leaf=is_weight):
        expert = bool(w.dims) and w.dims[0] == "experts"
        if (experts is not None and expert != experts) or \
                (matmul_only and (len(w.dims) < 2 or {w.dims[0], w.dims[-1]} & set(NOT_PROJECTIONS))):
            continue
        total += math.prod(shape_of(w, config)) * (min(reached, 1.0) if matmul_only and expert else 1)
    return int(total)


def gathered(tree, template, layout):
    """A tree of weights shaped as the Weight tree `template`, each placed by its layout alone
    (MeshLayout.gather: with fsdp_axes, all-gathered); a leaf the template does not describe (prefix
    tuning's memory, made from its MLP) passes as it is."""
    if layout is None or not layout.fsdp_axes:
        return tree
    if is_weight(template):
        return layout.gather(tree, template.dims)
    if isinstance(template, list):
        return [gathered(t, w, layout) for t, w in zip(tree, template)]
    return {name: gathered(t, template[name], layout) if name in template else t for name, t in tree.items()}


def compute_dtype(config):
    return jnp.bfloat16 if config.precision == "bfloat16" else jnp.float32


# --- embed, block, forward ---------------------------------------------------------------------


def embed(p, tokens, positions, config, layout, dropout_rng):
    """tokens, positions [batch, sequence] -> [batch, sequence, embd]."""
    x = p["wte"][tokens]
    position_term = embed_positions(p, positions, config)
    if position_term is not None:
        x = x + position_term
    if layout is not None:
        x = layout.constrain_letters(x, "bse")
    if dropout_rng is not None and config.embed_dropout > 0:
        x = dropout(jax.random.fold_in(dropout_rng, config.n_layer), x, config.embed_dropout)
    return x


def block(p, x, slots, first_slot, positions, layer_cache, kind: str, moe_layer: bool, config, layout, dropout_rng,
          template=None):
    """One pre-LN block: x += attn(LN(x)); x += mlp(LN(x)) (models/norms.py: LN is the block's
    prenorm; with rezero the identity, each branch times its gain). Macaron, GPT-Neo's form: first
    x += mlp_macaron(x) / 2, without norm or gain, in every layer; the last MLP is halved too. In a
    layer of moe_layers the last MLP is the mixture of experts (models/moe.py), which also gives its
    load-balancing loss and routing statistics. Returns (x, layer_cache, aux loss, statistics).
    `template`, the block's Weight tree: with fsdp_axes its weights are gathered here, inside the
    layer (and so inside recompute_grad's checkpoint: the backward gathers them again instead of
    keeping them)."""
    p = gathered(p, template, layout)
    attn_rng, res_rng_1, res_rng_2 = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None,) * 3
    p = lora.with_dropout_key(p, dropout_rng, config)
    if config.macaron:
        m = mlp(p["mlp_macaron"], x, config, layout)
        if dropout_rng is not None and config.res_dropout > 0:  # fold_in: the other branches keep their keys
            m = dropout(jax.random.fold_in(dropout_rng, 3), m, config.res_dropout)
        x = x + 0.5 * m
    apply_attention = KINDS[kind].apply
    if apply_attention is not None:
        a, layer_cache = apply_attention(p["attn"], prenorm(p.get("ln_1"), x, config), slots, first_slot,
                                         layer_cache, config, layout, attn_rng, positions)
        if res_rng_1 is not None and config.res_dropout > 0:
            a = dropout(res_rng_1, a, config.res_dropout)
        x = x + (p["rezero_1"] * a if config.rezero else a)
    normed = prenorm(p.get("ln_2"), x, config)
    aux_loss, stats = jnp.zeros((), jnp.float32), {}
    if moe_layer:
        moe_rng = jax.random.fold_in(dropout_rng, 4) if dropout_rng is not None else None
        m, aux_loss, stats = moe(p["moe"], normed, config, layout, training=dropout_rng is not None, rng=moe_rng,
                                 decoding=first_slot is not None)
    else:
        m = mlp(p["mlp"], normed, config, layout)
    if res_rng_2 is not None and config.res_dropout > 0:
        m = dropout(res_rng_2, m, config.res_dropout)
    if config.macaron:
        m = 0.5 * m
    x = x + (p["rezero_2"] * m if config.rezero else m)
    if layout is not None:
        x = layout.constrain_letters(x, "bse")
    return x, layer_cache, aux_loss, stats


def forward(params, tokens, config, layout=None, *, positions=None, cache=None, dropout_rng=None, begins_text=None):
    """tokens [batch, sequence] -> (hidden [batch, sequence, embd] after ln_f, cache, aux).

    Without a cache the tokens are a whole sequence from position 0 (training, evaluation).
    With one (`init_cache`) they are the next positions of the cached sequences: a prompt to
    prefill, or one new token; the returned cache holds them too. `positions` default to each
    row's slot minus its first slot. dropout_rng is the training step's key (dropout, and the
    MoE router's random second choices); None means evaluation or decoding: no dropout and
    deterministic routing. `aux` holds "losses", each auxiliary loss by name, already weighted
    (moe_aux_loss: the MoE layers' load-balancing losses, summed), and "metrics" to report
    (per MoE layer L: moe_dropped/L and moe_max_load/L, models/moe.py's `route`).

    With prompt_tuning_tokens, `begins_text` says whether these tokens start their texts, so that
    the virtual tokens go first (always so without a cache; with one the caller must say: True
    for the prefill, False for the tokens after it). They sit right after each row's padding and
    their outputs are left out of `hidden`.
    """
    virtual = config.prompt_tuning_tokens
    if virtual and cache is not None and begins_text is None:
        raise ValueError("forward: a prompt-tuned model decoding from a cache needs begins_text=True for the "
                         "prefill and False after it")
    prepend = bool(virtual) and (cache is None or begins_text)
    p = jax.tree.map(lambda w: w.astype(compute_dtype(config)), lora.with_prefix_memory(params))
    template = weights(config)
    p = gathered(p, {name: w for name, w in template.items() if name != "blocks"}, layout)  # each block's: in it
    length = tokens.shape[1]
    next_slot = 0 if cache is None else cache["next_slot"]
    first_slot = None if cache is None else cache["first_slot"]
    # the slots the tokens would have without the virtual tokens, which take the first `virtual`
    # slots of a text (after its padding): positions count the text's own tokens only
    token_slots = next_slot - (virtual if virtual and not prepend else 0) + jnp.arange(length)
    if positions is None:
        positions = jnp.broadcast_to(token_slots, tokens.shape) if cache is None else \
            jnp.maximum(token_slots[None, :] - first_slot[:, None], 0)  # padding slots reuse position 0
    x = embed(p, tokens, positions, config, layout, dropout_rng)
    padding = jnp.zeros((tokens.shape[0],), jnp.int32) if first_slot is None else first_slot
    if prepend:
        x, positions, kept = with_virtual_tokens(x, positions, p["prompt"], padding, layout)
        length += virtual
    slots = next_slot + jnp.arange(length)
    layer_caches = [None] * config.n_layer if cache is None else cache["layers"]
    new_caches, losses, metrics = [], {}, {}
    for layer, (kind, layer_cache) in enumerate(zip(config.layer_kinds, layer_caches)):
        block_params = p["blocks"][0 if config.share_parameters else layer]
        moe_layer = config.is_moe_layer(layer)
        layer_fn = functools.partial(block, kind=kind, moe_layer=moe_layer, config=config, layout=layout,
                                     template=template["blocks"][0 if config.share_parameters else layer])
        if config.recompute_grad:
            layer_fn = jax.checkpoint(layer_fn)
        layer_rng = jax.random.fold_in(dropout_rng, layer) if dropout_rng is not None else None
        x, layer_cache, aux_loss, stats = layer_fn(block_params, x, slots, first_slot, positions, layer_cache,
                                                   dropout_rng=layer_rng)
        x = kernels.residual_gradient_boundary(x, config)
        new_caches.append(layer_cache)
        if moe_layer:
            losses["moe_aux_loss"] = losses.get("moe_aux_loss", 0.0) + aux_loss
            metrics |= {f"moe_{name}/{layer}": value for name, value in stats.items()}
    if prepend:
        x = jnp.take_along_axis(x, kept[:, :, None], axis=1)
        if layout is not None:
            x = layout.constrain_letters(x, "bse")
    hidden = layer_norm(p["ln_f"], x, config)
    if cache is not None:
        cache = {"next_slot": next_slot + length, "first_slot": first_slot, "layers": new_caches}
    return hidden, cache, {"losses": losses, "metrics": metrics}


def with_virtual_tokens(x, positions, prompt, padding, layout):
    """Prompt tuning: x [batch, sequence, embd] of the tokens, each row left-padded by padding[b]
    slots -> (x [batch, virtual + sequence, embd] with the virtual tokens `prompt` [virtual, embd]
    right after each row's padding, their positions (0 for the virtual tokens: they take none), and
    kept [batch, sequence]: where each input slot's output now is)."""
    virtual, length = prompt.shape[0], x.shape[1]
    slot = jnp.arange(virtual + length)[None, :]
    into_prompt = slot - padding[:, None]  # >= 0 from the row's first text slot
    is_virtual = (into_prompt >= 0) & (into_prompt < virtual)
    source = jnp.where(slot < padding[:, None], slot, jnp.clip(slot - virtual, 0, length - 1))
    gathered = jnp.take_along_axis(x, source[:, :, None], axis=1)
    prompt_rows = prompt[jnp.clip(into_prompt, 0, virtual - 1)]
    x = jnp.where(is_virtual[:, :, None], prompt_rows.astype(x.dtype), gathered)
    positions = jnp.where(is_virtual, 0, jnp.take_along_axis(positions, source, axis=1))
    position = jnp.arange(length)[None, :]
    kept = jnp.where(position < padding[:, None], position, position + virtual)
    if layout is not None:
        x = layout.constrain_letters(x, "bse")
    return x, positions, kept


def init_cache(config, batch: int, cache_slots: int, first_slot=None, layout=None) -> dict:
    """An empty decoding cache of `cache_slots` slots per row; row b's text starts at slot
    first_slot[b] (its left padding; default 0)."""
    dtype = kernels.cache_dtype(compute_dtype(config))
    cache_slots += config.prompt_tuning_tokens  # the virtual tokens take slots too
    layers = [KINDS[kind].init_cache(config, batch, cache_slots, dtype, layout) for kind in config.layer_kinds]
    first_slot = jnp.zeros((batch,), jnp.int32) if first_slot is None else jnp.asarray(first_slot, jnp.int32)
    return {"next_slot": jnp.zeros((), jnp.int32), "first_slot": first_slot, "layers": layers}


# --- logits -------------------------------------------------------------------------------------


def output_weights(params, config):
    """(table [vocab, embd], bias [vocab] or None) of the output projection: the tied token
    embedding, or with no_weight_tie lm_head's weight and bias."""
    if config.no_weight_tie:
        return params["lm_head"]["w"], params["lm_head"]["bias"]
    return params["wte"], None


def unembed(hidden, output, config, layout=None, transposed: bool = False):
    """hidden [batch, sequence, embd] (after ln_f) -> float32 logits [batch, sequence, vocab]: the
    model's one output projection, for the loss, `logits` and sampling. `output` is
    output_weights(...); with `transposed` its table comes as [embd, vocab] (a caller that uses it
    many times, as the decode loop, may transpose it once)."""
    table, output_bias = output
    table = table.astype(hidden.dtype)  # then gathered, as forward casts its weights before gathering them
    if layout is not None:
        table = layout.gather(table, ("embd", "vocab") if transposed else ("vocab", "embd"))
        output_bias = None if output_bias is None else layout.gather(output_bias, ("vocab",))
    logits = project("bse,ev->bsv", hidden, table if transposed else table.T, config, layout).astype(jnp.float32)
    return logits if output_bias is None else logits + output_bias.astype(jnp.float32)


def logits(params, tokens, config, layout=None):
    """tokens [batch, sequence] -> float32 logits [batch, sequence, vocab] (no dropout)."""
    hidden, _, _ = forward(params, tokens, config, layout)
    return unembed(hidden, output_weights(params, config), config, layout)
