"""Load, override and validate a neomesh config.

Every key neomesh reads is defined once, in `KEYS` below, with its default and meaning.
GPT-Neo's JSON configs load unchanged: every key its code read is here, and each has a default
(several crashed GPT-Neo when absent).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import ConfigError

log = logging.getLogger("neomesh")

REPO_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = REPO_DIR / "configs"
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str  # int | float | bool | str | list | dict | any; "?" suffix: None is also accepted
    meaning: str
    # the values accepted beyond the kind, applied by validate() (to each element of a list):
    #   an interval "[0, 1)", "(0, inf)", "[1, 2^31)": a bound is a number, inf, 2^k or another int key
    #     ("[0, n_vocab)"); ints whose bound is 2^31 become int32 inside XLA (shapes, ids, step counters)
    #   choices "adam | adafactor"
    # Every float, whatever this says, must be finite: NaN and infinity are refused.
    accepts: str = ""


# fmt: off
KEYS: dict[str, Key] = {
    # --- model shape -------------------------------------------------------------------------
    "n_ctx": Key(2048, "int", "context length in tokens (dimension `sequence`)", "[1, 2^31)"),
    "n_embd": Key(768, "int", "width of the residual stream (dimension `embd`)", "[1, 2^31)"),
    "n_head": Key(12, "int", "attention heads (dimension `heads`); n_embd / n_head is `kv`", "[1, 2^31)"),
    # n_layer: blocks are unrolled in the compiled step, so compile time and compiler memory grow with
    # depth (on a 2-core CPU ~0.5 s and ~12 MB per layer; 2000 layers compiled for over 300 s). 1024 is
    # 10x GPT-3's 96 layers and admits the deepest published transformers (DeepNet's 1000 layers).
    "n_layer": Key(12, "int", "number of transformer blocks", "[1, 1024]"),
    "n_vocab": Key(50257, "int", "rows of the token embedding (dimension `vocab`); may exceed the tokenizer's size", "[1, 2^31)"),
    "attention_types": Key(None, "list?", "[[kinds, repeat], ...] expanded to one kind per layer: global | local | linear | gau | none; absent: all global"),
    "local_attention_radius": Key(256, "int", "a `local` layer's query attends to itself and the previous radius-1 positions", "[1, 2^31)"),
    "activation_function": Key("gelu", "str", "MLP activation (see models/activations.py for the names)"),
    "intermediate_size": Key(None, "int?", "MLP hidden width (dimension `intermediate_expanded`); absent: 4 * n_embd", "[1, 2^31)"),
    "layer_norm_epsilon": Key(1e-5, "float", "epsilon of every LayerNorm", "(0, inf)"),
    # --- architecture options ----------------------------------------------------------------
    "scale_by_depth": Key(True, "bool", "scale the init of the MLP's and gau's residual output projections by 1/sqrt(n_layer) (softmax and linear attention keep GPT-Neo's own init, see models/attention.py)"),
    "scale_by_in": Key(False, "bool", "scale the init of the MLP's and gau's projections by 1/sqrt(fan_in)"),
    "no_weight_tie": Key(False, "bool", "a separate biased output projection (lm_head) instead of the tied token embedding; ln_f stays"),
    "rotary_emb": Key(False, "bool", "rotary position embeddings instead of the learned table"),
    "axial_pos_emb": Key(None, "list?", "[a1, a2] with a1 * a2 = n_ctx: axial position embeddings (dimensions `axial_rows`, `axial_columns`); ignored when rotary_emb is on"),
    "num_mem_kv": Key(0, "int", "learned memory key/values (dimension `mem_kv`) prepended to the keys of every global layer, visible to every query; memory_length becomes n_ctx + num_mem_kv", "[0, 2^31)"),
    "gau_key_size": Key(128, "int", "a `gau` layer's q, k and v width s (dimension `gau_key`); even with rotary_emb", "[1, 2^31)"),
    "gau_expanded_size": Key(None, "int?", "a `gau` layer's gate width e (dimension `gau_expanded`); absent: 2 * n_embd", "[1, 2^31)"),
    "scalenorm": Key(False, "bool", "GPT-Neo's ScaleNorm (mean-centred, one scalar gain, no bias) instead of each block's LayerNorms; ln_f stays a LayerNorm"),
    "rezero": Key(False, "bool", "ReZero: no pre-norms; each residual branch times a learned scalar that starts at 0 (ln_f stays)"),
    "macaron": Key(False, "bool", "macaron blocks: a half-step MLP (no norm, no ReZero gain) before attention, and the block's MLP halved"),
    "mlp_glu": Key(False, "bool", "gated linear unit MLP: h * activation(gate), both halves intermediate_expanded wide (silu: SwiGLU)"),
    "share_parameters": Key(False, "bool", "one block's parameters for every layer; each layer keeps its attention kind"),
    "moe_layers": Key(None, "list?", "0-indexed layers whose MLP is a mixture of experts", "[0, n_layer)"),
    "moe_params": Key(None, "dict?", "mixture-of-experts settings: any of MOE_PARAMS' keys (mesh-tensorflow's names), the rest at their defaults"),
    "moe_activation": Key("relu", "any", "activation inside the experts (models/activations.py's names), or a list of them (GPT-Neo's form) for a gated expert: one input projection per entry, their activations multiplied; \"linear\" is the identity, e.g. [\"gelu\", \"linear\"]"),
    "entmax_loss": Key(False, "bool", "the entmax-1.3 Fenchel-Young loss instead of softmax cross-entropy (models/entmax.py); z_loss then does not apply, as in GPT-Neo"),
    "mlm_training": Key(False, "bool", "masked-language-model objective instead of causal LM"),
    "mlm_mask_id": Key(None, "int?", "token id of the MLM mask token", "[0, n_vocab)"),
    "mlm_cls_token_id": Key(None, "int?", "token id of the MLM CLS token", "[0, n_vocab)"),
    "mlm_mask_prob": Key(0.15, "float", "MLM: fraction of positions masked", "[0, 1]"),
    "mlm_same_token_prob": Key(0.10, "float", "MLM: fraction of masked positions left as they were", "[0, 1]"),
    "mlm_random_token_prob": Key(0.0, "float", "MLM: fraction of masked positions replaced by a random token", "[0, 1]"),
    "mlm_mask_ignore_ids": Key(None, "list?", "MLM: token ids never masked", "[0, n_vocab)"),
    # --- parameter-efficient fine-tuning (models/lora.py): with any of these on, only the adapters train
    "lora_rank": Key(0, "int", "LoRA: rank r of the low-rank factors A [in, lora_rank] and B [lora_rank, out] added to each projection of lora_targets (dimension `lora_rank`); 0: no LoRA; at most n_embd (a higher rank adds nothing a full update lacks)", "[0, n_embd]"),
    "lora_alpha": Key(16.0, "float", "LoRA: the low-rank term is scaled by lora_alpha / lora_rank", "(0, inf)"),
    "lora_dropout": Key(0.0, "float", "LoRA: dropout on a projection's input before its factor A, while training", "[0, 1)"),
    "lora_targets": Key(["q", "v"], "list", "LoRA: the projections that get factors, by weight name: attention's q, k, v, out; the MLP's fc, fc_gate, proj", "q | k | v | out | fc | fc_gate | proj"),
    "lora_base": Key("", "str", "fine-tuning: the frozen base model, a model_path folder (its newest checkpoint) or one checkpoint folder (.../checkpoints/STEP); empty: the newest checkpoint in model_path, else a random init (with a warning)"),
    "prompt_tuning_tokens": Key(0, "int", "prompt tuning: learned virtual token embeddings (dimension `virtual_tokens`) placed before every text; they take no position; 0: none; at most n_ctx", "[0, n_ctx]"),
    "prefix_tuning": Key(False, "bool", "prefix tuning: train only the num_mem_kv memory key/values of the global layers (the base frozen)"),
    "prefix_mlp_width": Key(0, "int", "prefix tuning: above 0, each layer's memory comes from a learned seed through an MLP this wide (dimension `prefix_hidden`, the prefix-tuning paper's reparametrisation); 0: the memory is trained directly", "[0, 2^16]"),
    # --- regularisation and loss -------------------------------------------------------------
    "embed_dropout": Key(0.0, "float", "dropout after the input embedding", "[0, 1)"),
    "attn_dropout": Key(0.0, "float", "dropout on attention probabilities", "[0, 1)"),
    "res_dropout": Key(0.0, "float", "dropout on each block's attention and MLP outputs", "[0, 1)"),
    "z_loss": Key(1e-4, "float", "weight of the log(Z)^2 penalty added to the cross-entropy", "[0, inf)"),
    # --- numerics and memory ---------------------------------------------------------------
    "precision": Key("float32", "str", "float32 | bfloat16 (bf16 compute, float32 master weights)", "float32 | bfloat16"),
    "recompute_grad": Key(False, "bool", "rematerialise each block in the backward pass (jax.checkpoint)"),
    "tokens_per_mb_per_replica": Key(None, "int?", "tokens per microbatch per batch replica; the step accumulates gradients over the microbatches", "[1, 2^31)"),
    # --- kernels: speed only, never the meaning (models/kernels.py) ----------------------------
    "attention_kernel": Key("auto", "str", "auto | plain | blocked | cudnn: how attention is computed; auto: cudnn for half precision on a GPU where it applies, else blocked; plain: the reference (one score matrix)", "auto | plain | blocked | cudnn"),
    "cpu_backward": Key("auto", "str", "auto | written | plain: written: projection gradients written for XLA:CPU's matmul kernels and a fusion boundary on the residual stream's gradient; plain: the gradients JAX derives; auto: written on a CPU (it won by 13-30% on every CPU measured; its gain shows only in a step of several layers, too long to probe at start-up), plain elsewhere", "auto | written | plain"),
    "cpu_probe": Key("auto", "str", "auto | off: on a CPU, main.py times XLA:CPU's dot libraries on the config's products and (where left auto) attention_kernel blocked vs plain on its attention (training) or decode_product's two orders on its decoding products (sampling) once per machine (cached in $NEOMESH_CACHE, default ~/.cache/neomesh) and runs with the fastest; off: XLA's defaults and blocked attention", "auto | off"),
    "decode_product": Key("auto", "str", "auto | rows_first | weights_first: how a decoding step (one position per batch row) multiplies its rows by each weight; rows_first: x [rows, in] . W [in, out]; weights_first: W [out, in] . x^T, the weights read out-first, copied to that order once per generation (a second copy of them in memory while sampling); auto: on a CPU weights_first where the probe (cpu_probe) times one token's products at predict_batch_size rows 5% faster that way and its copy of the block weights fits in half the memory available, else rows_first (also when unprobed and elsewhere)", "auto | rows_first | weights_first"),
    "decode_precision": Key("float32", "str", "float32 | bfloat16: the weights' type while sampling (--predict, sample.generate); bfloat16 computes as precision bfloat16 (products accumulate in float32), halves the weight bytes streamed per step where the dot library takes bfloat16 (on a CPU: batches of 2+ rows), and may change greedy tokens", "float32 | bfloat16"),
    # --- mesh ----------------------------------------------------------------------------------
    "mesh_shape": Key("", "str", 'named device mesh, e.g. "x:4,y:2"; empty: all local devices on the batch'),
    "layout": Key("", "str", 'tensor dimension -> mesh axis, e.g. "batch:x,heads:y"'),
    "fsdp_axes": Key("", "str", 'mesh axes, e.g. "x", over which every weight, its gradient and optimizer state are sharded further (fully sharded data parallel: gathered per layer where used); activations keep `layout`; "data" with an empty mesh_shape; empty: off'),
    # --- training ------------------------------------------------------------------------------
    "train_batch_size": Key(8, "int", "sequences per global training batch", "[1, 2^31)"),
    "train_steps": Key(1000, "int", "optimizer steps to train for", "[0, 2^31)"),
    "iterations": Key(100, "int", "steps between progress lines and metric logs", "[1, 2^31)"),
    "steps_per_checkpoint": Key(5000, "int", "steps between checkpoints (and evaluations); --steps_per_checkpoint overrides", "[1, 2^31)"),
    "keep_checkpoints": Key(3, "int", "how many of the newest checkpoints to keep", "[1, 2^31)"),
    "model_path": Key("", "str", "folder (local or gs://) for checkpoints, metrics and samples"),
    "model": Key("GPT", "str", 'model family: only "GPT"', "GPT"),
    "seed": Key(0, "int", "seed of the initialisation, dropout and data order", "[0, 2^63)"),
    "log_grads": Key(False, "bool", "true: also log each parameter's gradient norm (grad_norm/<path>, e.g. grad_norm/blocks.0.attn.q) with the metrics; the global norm is always logged"),
    "peak_flops": Key(0.0, "float", "FLOP/s of ONE device that MFU is measured against, e.g. 989e12 for an H100 in bfloat16; 0: the device's datasheet figure, else on a CPU its measured matmul roofline (MFU is NaN on an accelerator with no datasheet figure)", "[0, inf)"),
    # --- optimizer -----------------------------------------------------------------------------
    "opt_name": Key("adam", "str", "adam (decoupled weight decay, skipping norms and biases) | adafactor", "adam | adafactor"),
    "lr": Key(6e-4, "float", "peak learning rate", "[0, inf)"),
    "lr_decay": Key("cosine", "str", "cosine | linear (to 0.1 * lr over lr_decay_end steps) | none", "cosine | linear | none"),
    "lr_decay_end": Key(None, "int?", "step at which the decay reaches 0.1 * lr; absent: train_steps", "[1, 2^31)"),
    "warmup_steps": Key(0, "int", "linear warmup steps", "[0, 2^31)"),
    "beta1": Key(0.9, "float", "Adam beta1", "[0, 1)"),
    "beta2": Key(0.95, "float", "Adam beta2", "[0, 1)"),
    "epsilon": Key(1e-8, "float", "Adam epsilon", "(0, inf)"),
    "ada_epsilon1": Key(1e-30, "float", "Adafactor epsilon added to squared gradients", "(0, inf)"),
    "ada_epsilon2": Key(1e-3, "float", "Adafactor parameter-scale floor", "[0, inf)"),
    "weight_decay": Key(0.01, "float", "decoupled weight decay (not applied to norms and biases)", "[0, inf)"),
    "skip_nonfinite_steps": Key(False, "bool", "a step whose loss, gradient norm or updated parameters are not finite is skipped (the state stays as it was) and counted in metrics as skipped_steps; false: the run stops at such a step, saving nothing from it"),
    "gradient_clipping": Key(1.0, "float", "clip gradients to this global norm; 0 turns clipping off", "[0, inf)"),
    # --- data ----------------------------------------------------------------------------------
    "datasets": Key([], "list", "[[dataset_id, stitch, sampling_mode, weight], ...]; configs/dataset_configs/<id>.json"),
    "input_fn": Key("sequential_input", "str", "GPT-Neo's reader: sequential_input | generic_text (others are refused); neomesh reads every dataset with its one sampler (deterministic, honouring stitch, mode and weight), so a config that sets it is logged once", "sequential_input | generic_text"),
    "remove_partial_sequences": Key(False, "bool", "--predict: true writes each sample without its prompt (only the new tokens), as GPT-Neo's output without the partial sequences"),
    "shuffle_input_filenames": Key(True, "bool", "GPT-Neo shuffled the shard list when true; neomesh always shuffles examples deterministically from (seed, step), so false has no effect and is logged once"),
    "padding_id": Key(None, "int?", "padding token id; absent: the dataset config's; one >= n_vocab, or none, means eos_id (configs.special_ids)", "[0, 2^31)"),
    "eos_id": Key(None, "int?", "end-of-text token id; absent: the first dataset config's, else the tokenizer's (configs.special_ids)", "[0, n_vocab)"),
    # --- evaluation ----------------------------------------------------------------------------
    "eval_batch_size": Key(8, "int", "sequences per evaluation batch", "[1, 2^31)"),
    "eval_steps": Key(0, "int", "evaluation batches every checkpoint (0: no evaluation while training)", "[0, 2^31)"),
    "eval_tasks": Key([], "list", "task evaluations at every checkpoint and on --eval (eval_tasks.py): lambada (last-word accuracy lambada_acc, lambada_log_ppl, lambada_ppl)"),
    "lambada_path": Key("", "str", "eval_tasks lambada: the LAMBADA jsonl, one {\"text\": passage} per line (OpenAI's lambada_test.jsonl), local or gs://; never downloaded"),
    # --- sampling ------------------------------------------------------------------------------
    "predict_batch_size": Key(1, "int", "completions sampled per prompt", "[1, 2^31)"),
    "predict_steps": Key(0, "int", "GPT-Neo: above 0, sample from the prompt at every checkpoint while training; neomesh does not (run main.py --predict), so above 0 is logged once", "[0, 2^31)"),
    "predict_max_steps": Key(256, "int", "new tokens per completion (generation also stops at n_ctx)", "[0, 2^31)"),
    "temperature": Key(0.9, "float", "sampling temperature; 0 is greedy", "[0, inf)"),
    "top_k": Key(0, "int", "sample among the k most likely tokens; 0 turns it off", "[0, 2^31)"),
    "top_p": Key(1.0, "float", "nucleus sampling: the smallest set with this much probability; 1 turns it off", "(0, 1]"),
    "repetition_penalty": Key(1.0, "float", "divide positive (multiply negative) logits of tokens already present; 1 turns it off", "(0, inf)"),
    "sampling_seed": Key(0, "int", "seed of the sampler", "[0, 2^63)"),
}
# fmt: on

# moe_params: mesh-tensorflow 0.1.18's names and defaults, which GPT-Neo passed through (models/moe.py)
MOE_PARAMS: dict[str, Key] = {
    "moe_num_experts": Key(16, "int", "experts per MoE layer (dimension `experts`)", "[1, 2^31)"),
    "moe_gating": Key("top_2", "str", "each token goes to its best expert (top_1) or to its best two (top_2)", "top_1 | top_2"),
    "moe_capacity_factor_train": Key(1.25, "float", "training: an expert takes at most int(group tokens * this / experts) tokens of a group", "(0, inf)"),
    "moe_capacity_factor_eval": Key(2.0, "float", "the same in evaluation (decoding with a cache has no capacity limit)", "(0, inf)"),
    "moe_hidden_size": Key(4096, "int", "each expert's hidden width (dimension `expert_hidden`)", "[1, 2^31)"),
    "moe_group_size": Key(1024, "int", "tokens routed together: a row's run of at most this many positions (the largest divisor of n_ctx up to it)", "[1, 2^31)"),
    "moe_min_expert_capacity": Key(1, "int", "an expert's capacity is at least this", "[1, 2^31)"),
    "moe_loss_coef": Key(1e-2, "float", "weight of each MoE layer's load-balancing loss", "[0, inf)"),
    "moe_second_policy_train": Key("random", "str", "top_2, training: which second choices are kept: all | none | threshold (gate > threshold) | random (with probability gate / threshold)", "all | none | threshold | random"),
    "moe_second_policy_eval": Key("random", "str", "the same in evaluation and decoding, where random acts as threshold (deterministic)", "all | none | threshold | random"),
    "moe_second_threshold_train": Key(0.2, "float", "the threshold of moe_second_policy_train", "[0, 1]"),
    "moe_second_threshold_eval": Key(0.2, "float", "the threshold of moe_second_policy_eval", "[0, 1]"),
    "moe_dropout_rate": Key(0.0, "float", "dropout on the experts' hidden activations while training", "[0, 1)"),
    "moe_use_second_place_loss": Key(False, "bool", "mesh-tensorflow's extra balancing loss on second choices; neomesh does not build it, so true is refused"),
}

ATTENTION_KINDS = ("global", "local", "linear", "gau", "none")
INPUT_FNS = ("sequential_input", "generic_text")  # GPT-Neo's readers; neomesh has one sampler for both
EVAL_TASKS = {"lambada": True}  # GPT-Neo's task evaluations: name -> implemented in neomesh (eval_tasks.py)


# --- GPT-Neo's architecture options: what neomesh builds, what Hugging Face GPTNeo can hold ------
@dataclass(frozen=True)
class Option:
    what: str  # what the option is, in the words of messages and of README.md's table
    implemented: bool  # neomesh builds it; False: a config that sets it is refused by validate()
    hf: bool  # HF GPTNeoForCausalLM can express it; False: export.check_exportable refuses it
    hf_lacks: str = ""  # when hf is False: what HF GPTNeo has instead, for export's message


# activation_function: ours -> Hugging Face's ACT2FN name, for the activations HF can express
# (tests/test_export.py checks each pair numerically); any other activation is not exportable
HF_ACTIVATIONS = {
    "gelu": "gelu_new",  # both the tanh form
    "relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "silu": "silu",
    "swish": "swish",
    "mish": "mish",
    "id": "linear",
    "lrelu001": "leaky_relu",  # torch's default slope, 0.01
}

# A row is a key of KEYS, set when its value is truthy; "attention_types: KIND" rows are set when a
# layer has that kind; the activation_function row is set by an activation HF has no name for.
# Implementing an option is a one-line change here: its `implemented` becomes True.
# fmt: off
OPTIONS: dict[str, Option] = {
    #  row                       what                                                     implemented  hf
    "attention_types: global": Option("global attention",                                      True,  True),
    "attention_types: local":  Option("local attention",                                       True,  True),
    "attention_types: linear": Option("linear attention",                                      True,  False, "global and local attention only"),
    "attention_types: gau":    Option("gated attention units (GAU)",                           True,  False, "global and local attention only"),
    "attention_types: none":   Option("layers without attention",                              True,  False, "global and local attention only"),
    "rotary_emb":              Option("rotary position embeddings",                            True,  False, "a learned position table only"),
    "axial_pos_emb":           Option("axial position embeddings",                             True,  False, "a learned position table only"),
    "num_mem_kv":              Option("memory key/values",                                     True,  False, "no memory key/values"),
    "scalenorm":               Option("ScaleNorm",                                             True,  False, "LayerNorm only"),
    "rezero":                  Option("ReZero residuals",                                      True,  False, "pre-LN residuals only"),
    "macaron":                 Option("macaron blocks",                                        True,  False, "one MLP per block"),
    "mlp_glu":                 Option("a gated (GLU) MLP",                                     True,  False, "a plain two-layer MLP"),
    "share_parameters":        Option("parameters shared across layers",                       True,  False, "separate weights in every layer"),
    "no_weight_tie":           Option("an untied output projection",                           True,  False, "lm_head tied to wte"),
    "moe_layers":              Option("mixture-of-experts layers (moe_params, moe_activation)", True,  False, "no mixture of experts"),
    "entmax_loss":             Option("the entmax loss",                                       True,  False, "softmax outputs only"),
    "mlm_training":            Option("the masked-LM objective (the mlm_* keys)",               True,  False, "a causal LM only"),
    "activation_function":     Option("an activation outside Hugging Face's names",            True,  False,
                                      f"ACT2FN equivalents of {', '.join(HF_ACTIVATIONS)} only"),
}
# fmt: on

SAMPLING_MODES = ("documents_random", "documents_fixed", "chunks", "conversations")
DATASET_KEYS = {
    "n_vocab": Key(None, "int?", "token ids must be below this", "[1, 2^31)"),
    "path": Key("", "str", "glob of the training shards (local or gs://)"),
    "eval_path": Key("", "str", "glob of the evaluation shards"),
    "tokenizer_is_pretrained": Key(False, "bool", "tokenizer_path names a pretrained tokenizer (e.g. gpt2)"),
    "tokenizer_path": Key("", "str", "tokenizer.json path or pretrained name"),
    "eos_id": Key(None, "int?", "end-of-text id, joins stitched documents", "[0, 2^31)"),
    "padding_id": Key(None, "int?", "padding id", "[0, 2^31)"),
    "conversation_template": Key(None, "dict?", "the template the conversations were rendered with (--predict renders "
                                 "a conversation prompt with it)"),
}


class Config:
    """A validated config: every key of `KEYS` as an attribute, plus derived values. Every Config
    holds only options neomesh implements (see OPTIONS), however it was made."""

    def __init__(self, values: dict[str, Any], source: str):
        self.__dict__.update(values)
        self.source = source
        check_implemented(self)

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in KEYS}

    # --- derived values: computed here so that every stage agrees on them -------------------
    @property
    def layer_kinds(self) -> list[str]:
        return expand_attention_types(self.attention_types, self.n_layer)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def gau_expanded(self) -> int:
        return self.gau_expanded_size or 2 * self.n_embd

    @property
    def moe(self):
        """moe_params over MOE_PARAMS' defaults, by name without the moe_ prefix (moe.num_experts)."""
        from types import SimpleNamespace

        values = {key: spec.default for key, spec in MOE_PARAMS.items()} | (self.moe_params or {})
        return SimpleNamespace(**{key.removeprefix("moe_"): value for key, value in values.items()})

    def is_moe_layer(self, layer: int) -> bool:
        return layer in (self.moe_layers or ())

    @property
    def dim_sizes(self) -> dict[str, int]:
        """Size of every named tensor dimension (design §3)."""
        return {
            "vocab": self.n_vocab,
            "embd": self.n_embd,
            "heads": self.n_head,
            "kv": self.head_dim,
            "intermediate_expanded": self.mlp_width,
            "embed_sequence": self.n_ctx,
            "axial_rows": self.axial_pos_emb[0] if self.axial_pos_emb else 1,
            "axial_columns": self.axial_pos_emb[1] if self.axial_pos_emb else 1,
            "sequence": self.n_ctx,
            "memory_length": self.n_ctx + self.num_mem_kv,
            "mem_kv": self.num_mem_kv,
            "gau_key": self.gau_key_size,
            "gau_expanded": self.gau_expanded,
            "experts": self.moe.num_experts,
            "expert_hidden": self.moe.hidden_size,
            "batch": self.train_batch_size,
            "lora_rank": self.lora_rank,
            "virtual_tokens": self.prompt_tuning_tokens,
            "prefix_hidden": self.prefix_mlp_width,
        }

    def replace(self, **changes: Any) -> Config:
        values = self.to_dict()
        values.update(changes)
        return validate(values, self.source)


def attention_types_problem(attention_types: list | None, n_layer: int) -> str | None:
    """What is wrong with `attention_types` for n_layer layers, or None. The layer count is summed
    before anything is expanded, so a repeat of 10^12 is refused without building its list."""
    if attention_types is None:
        return None
    example = '[[["global", "local"], 6]]'
    layers = 0
    for entry in attention_types:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list) or not entry[0]
                or not isinstance(entry[1], int) or isinstance(entry[1], bool)):
            return f"entry {show(entry)} is not [[kinds...], repeat], e.g. {example}"
        kinds, repeat = entry
        for kind in kinds:
            if not isinstance(kind, str) or kind not in ATTENTION_KINDS:
                return f"unknown kind {show(kind)}; accepted: {', '.join(ATTENTION_KINDS)}"
        if repeat < 0:
            return f"entry {show(entry)}: the repeat count must be zero or more"
        layers += len(kinds) * repeat
    if layers != n_layer:
        return f"expands to {show(layers)} layers but n_layer = {n_layer}"
    return None


def expand_attention_types(attention_types: list | None, n_layer: int) -> list[str]:
    """One attention kind per layer. validate() has checked the entries (attention_types_problem)."""
    if attention_types is None:
        return ["global"] * n_layer
    problem = attention_types_problem(attention_types, n_layer)
    if problem is not None:
        raise ConfigError(f"key 'attention_types': {problem}")
    return [kind for kinds, repeat in attention_types for kind in list(kinds) * repeat]


def resolve_model_path(model: str) -> Path:
    """`--model NAME` -> configs/NAME.json; a path ending in .json is used as is."""
    if model.endswith(".json"):
        path = Path(model)
    else:
        path = CONFIGS_DIR / f"{model}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise ConfigError(f"--model {model}: no config file at {path}; configs here: {', '.join(known)}")
    return path


def load_config(model: str, overrides: list[str] | None = None) -> Config:
    """Read a model config (a name or a .json path), apply `key=value` overrides, validate."""
    path = resolve_model_path(model)
    values = read_json(path)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a JSON object of keys, not {type(values).__name__}")
    for override in overrides or []:
        key, value = parse_override(override)
        values[key] = value
    config = validate(values, str(path))
    for note in unused_key_notes(values, config):
        log.warning("%s", note)
    return config


def unused_key_notes(raw: dict[str, Any], config: Config) -> list[str]:
    """One line for each GPT-Neo key the config sets that neomesh accepts but does not act on (their
    meanings in KEYS say why). load_config logs them, so a run logs each once."""
    notes = []
    if "input_fn" in raw:
        notes.append(f"{config.source}: key 'input_fn' = {config.input_fn!r} selects nothing in neomesh: every "
                     "dataset is read by its one sampler (deterministic, honouring stitch, mode and weight)")
    if not config.shuffle_input_filenames:
        notes.append(f"{config.source}: key 'shuffle_input_filenames' = false has no effect: neomesh always "
                     "shuffles examples deterministically from (seed, step)")
    if config.axial_pos_emb and config.rotary_emb:
        notes.append(f"{config.source}: key 'axial_pos_emb' = {config.axial_pos_emb!r} has no effect: rotary_emb is on, "
                     "and rotary embeddings replace every position table (GPT-Neo's rule)")
    if config.predict_steps > 0:
        notes.append(f"{config.source}: key 'predict_steps' = {config.predict_steps} has no effect: neomesh does "
                     "not sample while training; run main.py --predict on a checkpoint")
    return notes


def read_json(path: Path) -> Any:
    """A JSON file's value; anything that is not a readable UTF-8 JSON file is a ConfigError naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); "
                          "a config is a UTF-8 JSON file") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to read; a config nests at most "
                          f"{MAX_NESTING} levels") from None
    except ValueError:  # an integer literal beyond Python's digit limit (4300 digits)
        raise ConfigError(f"{path}: holds an integer of more than {sys.get_int_max_str_digits()} digits, which "
                          "cannot be read; every number a config takes fits in 64 bits") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read as a config file: {err.strerror or err}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train_steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    check_known(key, f"--set {show(text)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key}=...: the value is nested too deeply; a config nests at most "
                          f"{MAX_NESTING} levels") from None
    except ValueError:  # an integer literal beyond Python's digit limit
        raise ConfigError(f"--set {key}=...: an integer of more than {sys.get_int_max_str_digits()} digits cannot "
                          "be read; every number a config takes fits in 64 bits") from None
    if KEYS[key].kind.startswith("str") and not isinstance(value, str):
        value = raw  # `--set mesh_shape=8` means the string "8"
    return key, value


def check_known(key: Any, where: str) -> None:
    if not isinstance(key, str) or key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6) if isinstance(key, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else "; see KEYS in configs.py for the known keys"
        raise ConfigError(f"{where}: unknown key {show(key)}{hint}")


MAX_NESTING = 8  # the deepest value a key takes is datasets' or attention_types' (3 levels)
MAX_SHOWN = 100  # characters of a value quoted in a message


def show(value: Any) -> str:
    """A value as a message quotes it: its repr, shortened; an integer too long to print (Python
    refuses to print one of more than 4300 digits) or a value too deep to print is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if nesting(value) > MAX_NESTING:
        return f"a {type(value).__name__} nested more than {MAX_NESTING} levels deep"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # a giant integer inside a list
        return f"a {type(value).__name__} holding a value too large to print"
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + " ..."


def nesting(value: Any, limit: int = MAX_NESTING + 1) -> int:
    """How deep lists and dicts nest in `value` (a scalar is 0), counted no further than `limit`."""
    if not isinstance(value, (list, tuple, dict)) or limit <= 0:
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((nesting(item, limit - 1) for item in items), default=0)


def check_type(key: str, value: Any, kind: str, where: str) -> Any:
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: key {key!r} is null; it takes a {base}")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "any": True,
    }[base]
    if not ok:
        raise ConfigError(f"{where}: key {key!r} has {show(value)} ({type(value).__name__}); it takes a {base}")
    if nesting(value) > MAX_NESTING:
        raise ConfigError(f"{where}: key {key!r} has {show(value)}; no key takes a value nested that deep")
    if base == "str" and "\x00" in value:
        raise ConfigError(f"{where}: key {key!r} = {show(value)} holds a NUL character, which no name or path may")
    if base == "float":
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: key {key!r} has {show(value)}: beyond the range of a float") from None
    if base == "bool":
        return bool(value)
    return value


def check_accepts(key: str, value: Any, spec: Key, values: dict[str, Any], where: str) -> None:
    """Apply spec.accepts (an interval or choices) and finiteness to a key's value, or to each element
    of a list value; a ConfigError names the key, the value and what is accepted."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, list):
        for element in value:
            check_element(key, element, value, spec, values, where)
    else:
        check_element(key, value, value, spec, values, where)


def check_element(key: str, element: Any, value: Any, spec: Key, values: dict[str, Any], where: str) -> None:
    def fail(accepted: str) -> None:
        of = "" if element is value else f" (element {show(element)})"
        raise ConfigError(f"{where}: key {key!r} = {show(value)}{of}: accepted: {accepted}")

    accepts = spec.accepts
    if isinstance(element, float) and not math.isfinite(element):
        fail(f"a finite number{' in ' + accepts if accepts.startswith(('[', '(')) else ''} (not NaN or infinity)")
    if not accepts:
        return
    if not accepts.startswith(("[", "(")):
        choices = [c.strip() for c in accepts.split("|")]
        if not isinstance(element, str) or element not in choices:
            fail(", ".join(choices))
        return
    low, high, closed_low, closed_high, words = interval(accepts, values)
    number = "an integer" if spec.kind.startswith(("int", "list")) else "a number"
    if spec.kind.startswith("list") and (not isinstance(element, int) or isinstance(element, bool)):
        fail(f"a list of integers in {words}")
    if not isinstance(element, (int, float)) or isinstance(element, bool):
        fail(f"{number} in {words}")
    inside_low = element >= low if closed_low else element > low
    inside_high = element <= high if closed_high else element < high
    if not (inside_low and inside_high):
        fail(f"{number} in {words}")


def interval(accepts: str, values: dict[str, Any]) -> tuple[float, float, bool, bool, str]:
    """(low, high, low is included, high is included, the interval in words) of "[0, 2^31)"-style text;
    a bound naming a key takes that key's value, and a power of two is written out."""
    low_text, high_text = (part.strip() for part in accepts[1:-1].split(","))

    def bound(text: str) -> tuple[float, str]:
        if text in ("inf", "-inf"):
            return float(text), text
        if text in KEYS:
            return values[text], f"{text} = {values[text]}"
        if "^" in text:
            base, exponent = text.split("^")
            return int(base) ** int(exponent), f"{text} = {int(base) ** int(exponent)}"
        return (float(text) if "." in text or "e" in text else int(text)), text

    (low, low_words), (high, high_words) = bound(low_text), bound(high_text)
    return low, high, accepts[0] == "[", accepts[-1] == "]", f"{accepts[0]}{low_words}, {high_words}{accepts[-1]}"


def validate(raw: dict[str, Any], source: str) -> Config:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check_known(key, source)
        values[key] = check_type(key, value, KEYS[key].kind, source)
    for key, spec in KEYS.items():
        values.setdefault(key, json.loads(json.dumps(spec.default)))
    # bounds that name another key ("[0, n_vocab)") come second, once that key has passed its own
    refers = {key for key, spec in KEYS.items() if spec.accepts.startswith(("[", "("))
              and {part.strip() for part in spec.accepts[1:-1].split(",")} & set(KEYS)}
    for key in [k for k in KEYS if k not in refers] + [k for k in KEYS if k in refers]:
        check_accepts(key, values[key], KEYS[key], values, source)

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: key {key!r} = {show(values[key])}: {message}")

    if values["n_embd"] % values["n_head"]:
        fail("n_embd", f"must divide evenly by n_head = {values['n_head']} (head size n_embd / n_head)")
    problem = attention_types_problem(values["attention_types"], values["n_layer"])
    if problem is not None:
        fail("attention_types", problem)
    from models.activations import ACTIVATIONS

    if values["activation_function"] not in ACTIVATIONS:
        close = difflib.get_close_matches(values["activation_function"], ACTIVATIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail("activation_function", f"unknown activation{hint} (accepted: {', '.join(sorted(ACTIVATIONS))})")
    for task in values["eval_tasks"]:
        if not isinstance(task, str) or task not in EVAL_TASKS:
            fail("eval_tasks", f"unknown task {show(task)}; GPT-Neo's tasks: {', '.join(EVAL_TASKS)}")
        if not EVAL_TASKS[task]:
            fail("eval_tasks", f"task evaluation ({task!r}) is not implemented in neomesh yet; accepted: []")
    if "lambada" in values["eval_tasks"] and not values["lambada_path"]:
        fail("lambada_path", "is empty but eval_tasks has 'lambada'; set it to the LAMBADA test set as jsonl, "
                             "one {\"text\": ...} per line (OpenAI's lambada_test.jsonl; neomesh downloads nothing)")
    if values["eval_tasks"] and values["mlm_training"]:
        fail("eval_tasks", "task evaluations score a causal model's next words; a masked-LM model (mlm_training) has none")
    kinds = expand_attention_types(values["attention_types"], values["n_layer"])
    if values["rotary_emb"] and "gau" in kinds and values["gau_key_size"] % 2:
        fail("gau_key_size", "must be even with rotary_emb: rotary embeddings turn pairs of dimensions")
    if values["rotary_emb"] and values["n_embd"] // values["n_head"] % 2:
        fail("n_head", f"gives an odd head size n_embd / n_head = {values['n_embd'] // values['n_head']}; "
                       "rotary_emb turns pairs of dimensions, so it must be even")
    axial = values["axial_pos_emb"]
    if axial is not None:
        if len(axial) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in axial):
            fail("axial_pos_emb", f"must be two positive integers [a1, a2] with a1 * a2 = n_ctx = {values['n_ctx']}")
        if axial[0] * axial[1] != values["n_ctx"]:
            fail("axial_pos_emb", f"a1 * a2 = {show(axial[0] * axial[1])} but n_ctx = {values['n_ctx']}: they must be equal")
    for entry in values["datasets"]:
        check_dataset_entry(entry, source)
    if values["mlm_training"] and any(entry[2] == "conversations" for entry in values["datasets"]):
        fail("datasets", "a conversations dataset trains a causal model on its assistant turns; mlm_training masks "
                         "tokens of plain text: accepted: no conversations entry with mlm_training")
    if values["mlm_training"]:
        check_masked_lm(values, fail)
    values["moe_params"] = check_moe(values, source, fail)
    check_fine_tuning(values, kinds, fail)

    from mesh import DATA_AXIS, parse_fsdp_axes, parse_layout, parse_mesh_shape

    mesh_axes = parse_mesh_shape(values["mesh_shape"], source)
    parse_layout(values["layout"], mesh_axes, source)
    parse_fsdp_axes(values["fsdp_axes"], mesh_axes or {DATA_AXIS: 0}, source)  # empty mesh_shape: one axis, data
    config = Config(values, source)  # refuses options not implemented yet
    check_sizes(config)
    return config


# The largest array XLA can describe: its shape's element count, and its size in bytes (up to 8 per
# element), must fit in int64; a larger one aborts the whole process inside XLA (SIGABRT, "overflow in
# static extent product") instead of raising an error, so validate() refuses it first.
MAX_ARRAY_ELEMENTS = 2**60


def check_sizes(config: Config) -> None:
    """Refuse, before JAX compiles anything, a model whose dimensions or arrays cannot be compiled:
    every dimension and token position must fit int32 (ids, positions and shapes are int32 inside
    the step), and every weight and the largest activations must be arrays XLA can describe."""
    where = config.source
    sizes = dict(config.dim_sizes, row=config.n_ctx + 1)  # a training row holds n_ctx + 1 tokens
    for dimension, size in sizes.items():
        if size > INT32_MAX:
            raise ConfigError(f"{where}: dimension {dimension!r} would be {size}, beyond 2^31 - 1 = {INT32_MAX} "
                              "(token ids, positions and sizes are int32 inside the step); make it smaller")
    import jax

    from models import gpt2

    arrays: list[tuple[str, int]] = []
    for path, weight in jax.tree_util.tree_flatten_with_path(gpt2.weights(config), is_leaf=gpt2.is_weight)[0]:
        arrays.append((f"weight {keystr(path)}", math.prod(gpt2.shape_of(weight, config))))
    batch = max(config.train_batch_size, config.eval_batch_size, config.predict_batch_size)
    tokens = batch * config.n_ctx
    arrays.append(("the logits [batch, sequence, vocab]", tokens * config.n_vocab))
    arrays.append(("the attention scores [batch, heads, sequence, memory_length]",
                   tokens * config.n_head * (config.n_ctx + config.num_mem_kv)))
    arrays.append(("the MLP activations [batch, sequence, intermediate_expanded]", tokens * config.mlp_width))
    if config.moe_layers:
        from models.moe import expert_capacity, group_tokens

        moe = config.moe
        capacity = expert_capacity(group_tokens(config.n_ctx, moe.group_size), moe.num_experts,
                                   max(moe.capacity_factor_train, moe.capacity_factor_eval), moe.min_expert_capacity)
        arrays.append(("the MoE dispatch [batch, groups, group_tokens, experts, expert_capacity]",
                       tokens * moe.num_experts * capacity))
    parameters = sum(count for name, count in arrays if name.startswith("weight "))
    arrays.append(("all parameters together", parameters))
    for name, elements in arrays:
        if elements > MAX_ARRAY_ELEMENTS:
            raise ConfigError(f"{where}: {name} would hold {elements:.3g} elements, beyond the 2^60 an XLA array "
                              f"can address (n_vocab {config.n_vocab}, n_embd {config.n_embd}, n_ctx {config.n_ctx}, "
                              f"n_head {config.n_head}, n_layer {config.n_layer}, batch {batch}); make the model smaller")


def keystr(path) -> str:
    """A parameter's path as neomesh names it elsewhere, e.g. blocks.0.attn.q."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def check_masked_lm(values: dict[str, Any], fail) -> None:
    """What mlm_training needs of the mlm_* keys beyond each key's own range (KEYS' accepts)."""
    if values["mlm_mask_id"] is None:
        fail("mlm_mask_id", f"mlm_training needs the id of its mask token: an integer in [0, n_vocab = {values['n_vocab']})")
    if values["mlm_cls_token_id"] == values["mlm_mask_id"]:
        fail("mlm_cls_token_id", "must differ from mlm_mask_id")
    if values["mlm_same_token_prob"] + values["mlm_random_token_prob"] > 1.0:
        fail("mlm_random_token_prob", f"plus mlm_same_token_prob = {values['mlm_same_token_prob']} exceeds 1: they are "
                                      "shares of the masked positions (the rest show mlm_mask_id)")
    if values["mlm_cls_token_id"] is not None and values["n_ctx"] < 2:
        fail("n_ctx", "must be at least 2 with mlm_cls_token_id: the CLS token takes the first position")


def check_fine_tuning(values: dict[str, Any], kinds: list[str], fail) -> None:
    """What LoRA, prompt and prefix tuning need beyond each key's own range."""
    if values["lora_rank"] and not values["lora_targets"]:
        fail("lora_targets", "is empty but lora_rank is set: name the projections to adapt, e.g. [\"q\", \"v\"]")
    if len(set(values["lora_targets"])) != len(values["lora_targets"]):
        fail("lora_targets", "names a projection twice")
    if values["lora_rank"] and "fc_gate" in values["lora_targets"] and not values["mlp_glu"]:
        fail("lora_targets", "names fc_gate, which only a gated MLP (mlp_glu) has")
    attention_targets = set(values["lora_targets"]) & {"q", "k", "v", "out"}
    if values["lora_rank"] and attention_targets == set(values["lora_targets"]) and \
            not {"global", "local", "linear"} & set(kinds):
        fail("lora_targets", "names only attention projections (q, k, v, out), which no layer of this model has "
                             "(gau and none layers have none); name MLP projections (fc, proj)")
    if values["prefix_tuning"] and not values["num_mem_kv"]:
        fail("prefix_tuning", "needs num_mem_kv > 0: the prefix is the memory key/values of the global layers")
    if values["prefix_tuning"] and "global" not in kinds:
        fail("prefix_tuning", "needs a global layer: memory key/values live in global attention")
    if values["prefix_mlp_width"] and not values["prefix_tuning"]:
        fail("prefix_mlp_width", "is set but prefix_tuning is off")
    if values["lora_base"] and not (values["lora_rank"] or values["prompt_tuning_tokens"] or values["prefix_tuning"]):
        fail("lora_base", "names a base model, but no fine-tuning adapter is on (lora_rank, prompt_tuning_tokens, prefix_tuning)")


def check_moe(values: dict[str, Any], source: str, fail) -> dict[str, Any] | None:
    """moe_params' keys, each against MOE_PARAMS, and moe_activation; returns moe_params as checked."""
    from models.moe import EXPERT_ACTIVATIONS

    activation = values["moe_activation"]
    names = [activation] if isinstance(activation, str) else activation
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        fail("moe_activation", 'takes an activation name or a non-empty list of them, e.g. "relu" or ["gelu", "linear"]')
    for name in names:
        if name not in EXPERT_ACTIVATIONS:
            close = difflib.get_close_matches(name, EXPERT_ACTIVATIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            fail("moe_activation", f"unknown activation {show(name)}{hint} (accepted: {', '.join(sorted(EXPERT_ACTIVATIONS))})")
    params = values["moe_params"]
    if params is None:
        return None
    checked = {}
    for key, value in params.items():
        if key not in MOE_PARAMS:
            close = difflib.get_close_matches(str(key), MOE_PARAMS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            fail("moe_params", f"unknown key {show(key)}{hint} (accepted: {', '.join(MOE_PARAMS)})")
        name = f"moe_params.{key}"
        checked[key] = check_type(name, value, MOE_PARAMS[key].kind, source)
        check_accepts(name, checked[key], MOE_PARAMS[key], values, source)
    if checked.get("moe_use_second_place_loss"):
        fail("moe_params", "moe_use_second_place_loss: neomesh does not build the second-place loss; accepted: false")
    return checked


def check_dataset_entry(entry: Any, source: str) -> None:
    example = '["mydata", 25, "documents_random", 1.0]'
    if not isinstance(entry, list) or len(entry) != 4:
        raise ConfigError(f"{source}: key 'datasets' has entry {show(entry)}; each entry is [id, stitch, mode, weight], e.g. {example}")
    dataset_id, stitch, mode, weight = entry
    where = f"{source}: key 'datasets' entry {show(entry)}"
    if not isinstance(dataset_id, str) or not dataset_id or any(c in dataset_id for c in "/\\\x00"):
        raise ConfigError(f"{where}: the id must be a non-empty string naming configs/dataset_configs/<id>.json "
                          "(no slash or NUL)")
    if not isinstance(stitch, int) or isinstance(stitch, bool) or not 0 < stitch <= INT32_MAX:
        raise ConfigError(f"{where}: stitch must be an integer in [1, 2^31)")
    if not isinstance(mode, str) or mode not in SAMPLING_MODES:
        raise ConfigError(f"{where}: sampling mode {show(mode)} is not one of {', '.join(SAMPLING_MODES)}")
    if mode == "conversations" and stitch != 1:
        raise ConfigError(f"{where}: stitch must be 1 in conversations mode: a row holds one conversation")
    # a weight is used as a float: an integer beyond a float's range is refused like infinity
    if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < 1e300
            or not math.isfinite(float(weight))):
        raise ConfigError(f"{where}: weight must be a finite positive number")



# --- the options table, applied -------------------------------------------------------------


def option_use(row: str, config: Config) -> str | None:
    """How `config` uses the option of OPTIONS[row], for a message (e.g. "key 'rotary_emb' = True"), or
    None when it does not."""
    if row.startswith("attention_types: "):
        kind = row.split(": ", 1)[1]
        layers = [i for i, k in enumerate(config.layer_kinds) if k == kind]
        return f"key 'attention_types': layer {layers[0]} is {kind!r}" if layers else None
    value = getattr(config, row)
    if row == "activation_function":
        return None if value in HF_ACTIVATIONS else f"key 'activation_function' = {value!r}"
    return f"key {row!r} = {value!r}" if value else None


def options_in_use(config: Config) -> list[tuple[str, Option, str]]:
    """(row, option, how it is used) for every row of OPTIONS the config uses, in table order."""
    used = ((row, option, option_use(row, config)) for row, option in OPTIONS.items())
    return [(row, option, use) for row, option, use in used if use is not None]


def check_implemented(config: Config) -> None:
    """Refuse, naming the key, an option neomesh does not build yet. Config() calls this, so no config
    that reaches the model, a train or eval step, the sampler or a benchmark holds one."""
    for row, option, use in options_in_use(config):
        if option.implemented:
            continue
        if row.startswith("attention_types: "):
            kinds = [r.split(": ", 1)[1] for r, o in OPTIONS.items() if r.startswith("attention_types: ") and o.implemented]
            accepted = f"implemented kinds: {', '.join(kinds)}"
        else:
            accepted = f"accepted: {json.dumps(KEYS[row].default)}"
        raise ConfigError(f"{config.source}: {use}: neomesh does not implement {option.what} yet; {accepted}")


def options_table() -> str:
    """README.md's table of GPT-Neo's architecture options, generated from OPTIONS (`python configs.py
    --readme` rewrites it; tests/test_configs.py fails when README.md's copy is out of date)."""
    lines = ["| option | neomesh | Hugging Face GPTNeo (export) |", "|---|---|---|"]
    for row, option in OPTIONS.items():
        if row.startswith("attention_types: "):
            name = f"`attention_types` kind `{row.split(': ', 1)[1]}`"
        else:
            name = f"`{row}`"
        hf = "yes" if option.hf else f"no: HF GPTNeo has {option.hf_lacks}"
        lines.append(f"| {name}: {option.what} | {'yes' if option.implemented else 'not yet: refused'} | {hf} |")
    return "\n".join(lines) + "\n"


README_TABLE_START = "<!-- options table: generated from configs.OPTIONS by `python configs.py --readme` -->\n"
README_TABLE_END = "<!-- end of options table -->\n"


def readme_with_options_table(readme: str) -> str:
    """README.md's text with the options table between its two markers replaced by options_table()."""
    if README_TABLE_START not in readme or README_TABLE_END not in readme:
        raise ValueError(f"README.md has lost the markers of the options table: {README_TABLE_START.strip()}")
    head, rest = readme.split(README_TABLE_START, 1)
    _, tail = rest.split(README_TABLE_END, 1)
    return head + README_TABLE_START + options_table() + README_TABLE_END + tail


@dataclass(frozen=True)
class DatasetConfig:
    id: str
    file: str
    n_vocab: int | None
    path: str
    eval_path: str
    tokenizer_is_pretrained: bool
    tokenizer_path: str
    eos_id: int | None
    padding_id: int | None
    conversation_template: dict | None
    stitch: int
    mode: str
    weight: float


def masked_labels(config: Config) -> bool:
    """Whether labels mark positions the loss skips (inputs.NOT_PREDICTED), so that the loss is the
    mean over the others: with mlm_training (the masked positions are scored) and with a
    conversations dataset (its assistant tokens are)."""
    return config.mlm_training or any(entry[2] == "conversations" for entry in config.datasets)


def dataset_config_dirs(config: Config) -> list[Path]:
    """Where dataset configs are looked for: beside the model config, then the repository's."""
    dirs = []
    if config.source:
        dirs.append(Path(config.source).resolve().parent / "dataset_configs")
    dirs.append(CONFIGS_DIR / "dataset_configs")
    return list(dict.fromkeys(dirs))


def resolve_datasets(config: Config) -> list[DatasetConfig]:
    """The dataset configs named by `datasets`: a missing one is a ConfigError naming the id."""
    if not config.datasets:
        raise ConfigError(f"{config.source}: key 'datasets' is empty; name at least one dataset, e.g. "
                          '[["mydata", 25, "documents_random", 1.0]] with configs/dataset_configs/mydata.json')
    resolved = []
    for entry in config.datasets:
        dataset_id = entry[0]
        found = find_dataset_config(config, dataset_id)
        if found is None:
            candidates = [d / f"{dataset_id}.json" for d in dataset_config_dirs(config)]
            raise ConfigError(
                f"{config.source}: key 'datasets' names {dataset_id!r} but no dataset config exists at "
                f"{' or '.join(str(p) for p in candidates)}"
            )
        resolved.append(read_dataset_config(found, entry))
    return resolved


def find_dataset_config(config: Config, dataset_id: str) -> Path | None:
    candidates = [d / f"{dataset_id}.json" for d in dataset_config_dirs(config)]
    return next((p for p in candidates if p.is_file()), None)


def read_dataset_config(found: Path, entry: list) -> DatasetConfig:
    dataset_id, stitch, mode, weight = entry
    values = read_json(found)
    if not isinstance(values, dict):
        raise ConfigError(f"{found}: a dataset config is a JSON object")
    checked = {}
    for key, value in values.items():
        if key not in DATASET_KEYS:
            raise ConfigError(f"{found}: unknown key {key!r}; accepted: {', '.join(DATASET_KEYS)}")
        checked[key] = check_type(key, value, DATASET_KEYS[key].kind, str(found))
        check_accepts(key, checked[key], DATASET_KEYS[key], checked, str(found))
    for key, spec in DATASET_KEYS.items():
        checked.setdefault(key, spec.default)
    if not checked["path"]:
        raise ConfigError(f"{found}: key 'path' is empty; it is the glob of the training shards")
    # relative paths are relative to the working directory, as in GPT-Neo
    return DatasetConfig(id=dataset_id, file=str(found), stitch=stitch, mode=mode, weight=float(weight), **checked)


def special_ids(config: Config, tokenizer=None, dataset: DatasetConfig | None = None) -> tuple[int | None, int | None]:
    """(eos_id, padding_id) for a config: the one rule that training, sampling and export follow.

    eos_id: the config's key 'eos_id'; else the dataset config's 'eos_id' (of `dataset`, or else of the
        first entry of `datasets`, when its dataset config exists); else the end-of-text token of
        `tokenizer`, when the caller has one loaded (sampling and export do; training reads ids only);
        else None: no end-of-text token, so generation runs to its length.
    padding_id: the config's key 'padding_id'; else the dataset config's. One that no embedding row
        holds (>= n_vocab, as GPT-Neo's GPT-2 dataset configs say: padding_id = n_vocab), or none at
        all, means eos_id.
    `tokenizer` is any object with an `eos_id` (encoders.Tokenizer), so configs imports no tokenizer.
    """
    if dataset is None and config.datasets:
        found = find_dataset_config(config, config.datasets[0][0])
        dataset = read_dataset_config(found, config.datasets[0]) if found is not None else None
    eos_id = config.eos_id
    if eos_id is None and dataset is not None:
        eos_id = dataset.eos_id
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    padding_id = config.padding_id
    if padding_id is None and dataset is not None:
        padding_id = dataset.padding_id
    if padding_id is None or padding_id >= config.n_vocab:
        padding_id = eos_id
    return eos_id, padding_id


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python configs.py --readme   (rewrites README.md's table of architecture options)")
    readme_path = REPO_DIR / "README.md"
    readme_path.write_text(readme_with_options_table(readme_path.read_text()))
    print(f"wrote the options table into {readme_path}")
