"""Parameter-efficient fine-tuning: LoRA, prompt tuning and prefix tuning.

Each adds a few weights, marked `adapter` in their `Weight`, to the model's tree
(`with_adapters`, called by gpt2.weights); with any of them on, only those train. The training
state then holds the adapters as its `params` (and the optimizer state for them alone) and the
frozen rest as `base`, which no gradient reaches and no checkpoint of the adapters stores
(`split`, `join`).

LoRA (lora_rank r > 0): every projection named in lora_targets (a weight name of attention, q k v
out, or of an MLP, fc fc_gate proj) gains factors A [in..., lora_rank] (normal, std 1/sqrt(fan
in)) and B [lora_rank, out...] (zeros), stored beside it as `<name>_lora_a` / `<name>_lora_b`;
the projection becomes x.W + (lora_alpha / r) * (dropout(x).A).B (`project`). B = 0 at the start,
so the model starts as its base. `merged` folds A.B into W (export.py --merge_lora).

Prompt tuning (prompt_tuning_tokens N > 0): N learned vectors `prompt` [virtual_tokens, embd]
enter before each text's first token as if they were embedded tokens (gpt2.forward places them
right after a row's left padding, so that every row sees them at the same distance). They take
no position term (rotary turns them by position 0), so that the text keeps positions 0, 1, ...
and n_ctx still bounds it; their outputs are dropped.

Prefix tuning (prefix_tuning): the memory key/values of num_mem_kv (models/attention.py: every
query of a global layer sees them) are trained alone; with prefix_mlp_width H > 0 through the
prefix-tuning paper's reparametrisation: per layer a seed [mem_kv, embd] and an MLP embd -> H ->
tanh -> (heads, kv) for keys and for values, whose outputs are the memory (`with_prefix_memory`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mesh import DIMENSION_LETTERS
from models.dropout import dropout
from models.kernels import project as plain_project
from models.params import Weight, bias, is_weight

# the projections lora_targets may name, by the sub-tree of a block that holds them
ATTENTION_TARGETS = ("q", "k", "v", "out")
MLP_TARGETS = ("fc", "fc_gate", "proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
DROPOUT_KEY = "lora_dropout_key"  # where gpt2.block leaves the layer's dropout key for `project`


def active(config) -> bool:
    """Whether the config fine-tunes adapters only (the base frozen)."""
    return bool(config.lora_rank or config.prompt_tuning_tokens or config.prefix_tuning)


def scale(config) -> float:
    return config.lora_alpha / config.lora_rank


# --- the weights ---------------------------------------------------------------------------------


def with_adapters(tree: dict, config) -> dict:
    """The model's Weight tree with the adapters the config asks for."""
    if not active(config):
        return tree
    tree = dict(tree)
    if config.prompt_tuning_tokens:
        tree["prompt"] = Weight(("virtual_tokens", "embd"), 0.02, adapter=True)
    tree["blocks"] = [block_adapters(block, config) for block in tree["blocks"]]
    return tree


def block_adapters(block: dict, config) -> dict:
    block = dict(block)
    for part, names in (("attn", ATTENTION_TARGETS), ("mlp", MLP_TARGETS), ("mlp_macaron", MLP_TARGETS)):
        if part not in block:
            continue
        weights = dict(block[part])
        if config.lora_rank:
            for name in names:
                if name in config.lora_targets and name in weights:
                    weights |= lora_factors(name, weights[name], config)
        if part == "attn" and config.prefix_tuning and "mem_k" in weights:
            if config.prefix_mlp_width:
                del weights["mem_k"], weights["mem_v"]
                weights["prefix"] = prefix_weights(config)
            else:
                weights["mem_k"] = dataclasses.replace(weights["mem_k"], adapter=True)
                weights["mem_v"] = dataclasses.replace(weights["mem_v"], adapter=True)
        block[part] = weights
    return block


def lora_factors(name: str, weight: Weight, config) -> dict[str, Weight]:
    """A [in..., lora_rank] and B [lora_rank, out...] for a projection weight [in..., out...]:
    `in` is its leading dimension, or (heads, kv) for attention's output projection."""
    inputs = 2 if name == "out" else 1
    fan_in = math.prod(config.dim_sizes[dim] for dim in weight.dims[:inputs])
    return {f"{name}_lora_a": Weight((*weight.dims[:inputs], "lora_rank"), fan_in ** -0.5, adapter=True),
            f"{name}_lora_b": Weight(("lora_rank", *weight.dims[inputs:]), "zeros", adapter=True)}


def prefix_weights(config) -> dict[str, Weight]:
    embd, width = config.n_embd, config.prefix_mlp_width

    def adapter(weight: Weight) -> Weight:
        return dataclasses.replace(weight, adapter=True)

    return {"seed": adapter(Weight(("mem_kv", "embd"), 1.0)),
            "fc": adapter(Weight(("embd", "prefix_hidden"), embd ** -0.5)),
            "fc_bias": adapter(bias(("prefix_hidden",))),
            "k": adapter(Weight(("prefix_hidden", "heads", "kv"), width ** -0.5)),
            "k_bias": adapter(bias(("heads", "kv"))),
            "v": adapter(Weight(("prefix_hidden", "heads", "kv"), width ** -0.5)),
            "v_bias": adapter(bias(("heads", "kv")))}


def with_prefix_memory(params: dict) -> dict:
    """The parameter tree with each layer's `prefix` MLP turned into its memory key/values."""
    if not any("prefix" in block.get("attn", {}) for block in params["blocks"]):
        return params
    blocks = []
    for block in params["blocks"]:
        attn = block.get("attn", {})
        if "prefix" in attn:
            prefix = attn["prefix"]
            hidden = jnp.tanh(prefix["seed"] @ prefix["fc"] + prefix["fc_bias"])
            attn = {name: w for name, w in attn.items() if name != "prefix"}
            attn["mem_k"] = jnp.einsum("nj,jhk->nhk", hidden, prefix["k"]) + prefix["k_bias"]
            attn["mem_v"] = jnp.einsum("nj,jhk->nhk", hidden, prefix["v"]) + prefix["v_bias"]
            block = {**block, "attn": attn}
        blocks.append(block)
    return {**params, "blocks": blocks}


# --- LoRA's projection ------------------------------------------------------------------------------


def project(spec: str, x, p: dict, name: str, config, layout=None):
    """kernels.project of x by p[name], plus LoRA's low-rank term where p holds its factors."""
    out = plain_project(spec, x, p[name], config, layout)
    if f"{name}_lora_a" not in p:
        return out
    operands, output = spec.split("->")
    x_letters, w_letters = operands.split(",")
    rank = DIMENSION_LETTERS["lora_rank"]
    inputs = len([letter for letter in w_letters if letter in x_letters and letter not in output])
    rows = x_letters[:-inputs]
    if DROPOUT_KEY in p and config.lora_dropout > 0:
        x = dropout(jax.random.fold_in(p[DROPOUT_KEY], TARGETS.index(name)), x, config.lora_dropout)
    down = plain_project(f"{x_letters},{w_letters[:inputs]}{rank}->{rows}{rank}", x, p[f"{name}_lora_a"], config, layout)
    up = plain_project(f"{rows}{rank},{rank}{w_letters[inputs:]}->{output}", down, p[f"{name}_lora_b"], config, layout)
    return out + (scale(config) * up).astype(out.dtype)


def with_dropout_key(p: dict, rng, config) -> dict:
    """A block's parameters with its LoRA dropout key beside the factors that use it."""
    if rng is None or not config.lora_rank or config.lora_dropout <= 0:
        return p
    p = dict(p)
    for index, part in enumerate(("attn", "mlp", "mlp_macaron")):
        if part in p and any(name.endswith("_lora_a") for name in p[part]):
            p[part] = {**p[part], DROPOUT_KEY: jax.random.fold_in(rng, 100 + index)}
    return p


def merged(params: dict, config) -> dict:
    """The parameter tree with each W replaced by W + scale * A.B and the factors removed: the same
    function as the adapted model, as plain weights (prompt and prefix tuning cannot fold so)."""
    factor = scale(config) if config.lora_rank else 0.0

    def merge(weights):
        if not isinstance(weights, dict):
            return weights
        weights = {name: merge(w) for name, w in weights.items()}
        for name in TARGETS:
            if f"{name}_lora_a" in weights:
                a, b = weights.pop(f"{name}_lora_a"), weights.pop(f"{name}_lora_b")
                weights[name] = weights[name] + factor * jnp.tensordot(a, b, 1)
        return weights

    return {**params, "blocks": [merge(block) for block in params["blocks"]]}


# --- frozen base and trained adapters --------------------------------------------------------------


def split(tree, template):
    """(base, adapters) of a tree shaped as the Weight tree `template` (arrays, shardings, shapes):
    base keeps the template's structure less the adapters; adapters holds only them, a list level
    becoming a dict keyed by index ('0', '1', ...) so that no empty container is left in it."""
    if is_weight(template):
        return (None, tree) if template.adapter else (tree, None)
    if isinstance(template, list):
        parts = [split(tree[i], t) for i, t in enumerate(template)]
        base = [b if b is not None else {} for b, _ in parts]
        adapters = {str(i): a for i, (_, a) in enumerate(parts) if a is not None}
        return base, adapters or None
    base, adapters = {}, {}
    for key, sub_template in template.items():
        b, a = split(tree[key], sub_template)
        if b is not None and not (isinstance(b, dict) and not b):
            base[key] = b
        if a is not None:
            adapters[key] = a
    return base, adapters or None


def join(base, adapters, template):
    """The whole tree again from `split`'s two parts."""
    if is_weight(template):
        return adapters if template.adapter else base
    if isinstance(template, list):
        adapters = adapters or {}
        return [join(base[i], adapters.get(str(i)), t) for i, t in enumerate(template)]
    base, adapters = base or {}, adapters or {}
    return {key: join(base.get(key), adapters.get(key), t) for key, t in template.items()}

