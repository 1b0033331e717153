"""Load, override and validate a neomesh config.

Every key neomesh reads is defined once, in `KEYS` below, with its default and meaning.
GPT-Neo's JSON configs load unchanged: every key its code read is here, and each has a default
(several crashed GPT-Neo when absent).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import ConfigError

log = logging.getLogger("neomesh")

REPO_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = REPO_DIR / "configs"


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str  # int | float | bool | str | list | dict | any; "?" suffix: None is also accepted
    meaning: str


# fmt: off
KEYS: dict[str, Key] = {
    # --- model shape -------------------------------------------------------------------------
    "n_ctx": Key(2048, "int", "context length in tokens (dimension `sequence`)"),
    "n_embd": Key(768, "int", "width of the residual stream (dimension `embd`)"),
    "n_head": Key(12, "int", "attention heads (dimension `heads`); n_embd / n_head is `kv`"),
    "n_layer": Key(12, "int", "number of transformer blocks"),
    "n_vocab": Key(50257, "int", "rows of the token embedding (dimension `vocab`); may exceed the tokenizer's size"),
    "attention_types": Key(None, "list?", "[[kinds, repeat], ...] expanded to one kind per layer: global | local | linear | gau | none; absent: all global"),
    "local_attention_radius": Key(256, "int", "a `local` layer's query attends to itself and the previous radius-1 positions"),
    "activation_function": Key("gelu", "str", "MLP activation (see models/activations.py for the names)"),
    "intermediate_size": Key(None, "int?", "MLP hidden width (dimension `intermediate_expanded`); absent: 4 * n_embd"),
    "layer_norm_epsilon": Key(1e-5, "float", "epsilon of every LayerNorm"),
    # --- architecture options ----------------------------------------------------------------
    "scale_by_depth": Key(True, "bool", "scale the init of the MLP's and gau's residual output projections by 1/sqrt(n_layer) (softmax and linear attention keep GPT-Neo's own init, see models/attention.py)"),
    "scale_by_in": Key(False, "bool", "scale the init of the MLP's and gau's projections by 1/sqrt(fan_in)"),
    "no_weight_tie": Key(False, "bool", "a separate biased output projection (lm_head) instead of the tied token embedding; ln_f stays"),
    "rotary_emb": Key(False, "bool", "rotary position embeddings instead of the learned table"),
    "axial_pos_emb": Key(None, "list?", "[a1, a2] with a1 * a2 = n_ctx: axial position embeddings (dimensions `axial_rows`, `axial_columns`); ignored when rotary_emb is on"),
    "num_mem_kv": Key(0, "int", "learned memory key/values (dimension `mem_kv`) prepended to the keys of every global layer, visible to every query; memory_length becomes n_ctx + num_mem_kv"),
    "gau_key_size": Key(128, "int", "a `gau` layer's q, k and v width s (dimension `gau_key`); even with rotary_emb"),
    "gau_expanded_size": Key(None, "int?", "a `gau` layer's gate width e (dimension `gau_expanded`); absent: 2 * n_embd"),
    "scalenorm": Key(False, "bool", "GPT-Neo's ScaleNorm (mean-centred, one scalar gain, no bias) instead of each block's LayerNorms; ln_f stays a LayerNorm"),
    "rezero": Key(False, "bool", "ReZero: no pre-norms; each residual branch times a learned scalar that starts at 0 (ln_f stays)"),
    "macaron": Key(False, "bool", "macaron blocks: a half-step MLP (no norm, no ReZero gain) before attention, and the block's MLP halved"),
    "mlp_glu": Key(False, "bool", "gated linear unit MLP: h * activation(gate), both halves intermediate_expanded wide (silu: SwiGLU)"),
    "share_parameters": Key(False, "bool", "one block's parameters for every layer; each layer keeps its attention kind"),
    "moe_layers": Key(None, "list?", "0-indexed layers whose MLP is a mixture of experts"),
    "moe_params": Key(None, "dict?", "mixture-of-experts settings (experts, gating, hidden size)"),
    "moe_activation": Key("relu", "str", "activation inside the experts"),
    "entmax_loss": Key(False, "bool", "entmax loss instead of softmax cross-entropy"),
    "mlm_training": Key(False, "bool", "masked-language-model objective instead of causal LM"),
    "mlm_mask_id": Key(None, "int?", "token id of the MLM mask token"),
    "mlm_cls_token_id": Key(None, "int?", "token id of the MLM CLS token"),
    "mlm_mask_prob": Key(0.15, "float", "MLM: fraction of positions masked"),
    "mlm_same_token_prob": Key(0.10, "float", "MLM: fraction of masked positions left as they were"),
    "mlm_random_token_prob": Key(0.0, "float", "MLM: fraction of masked positions replaced by a random token"),
    "mlm_mask_ignore_ids": Key(None, "list?", "MLM: token ids never masked"),
    # --- regularisation and loss -------------------------------------------------------------
    "embed_dropout": Key(0.0, "float", "dropout after the input embedding"),
    "attn_dropout": Key(0.0, "float", "dropout on attention probabilities"),
    "res_dropout": Key(0.0, "float", "dropout on each block's attention and MLP outputs"),
    "z_loss": Key(1e-4, "float", "weight of the log(Z)^2 penalty added to the cross-entropy"),
    # --- numerics and memory ---------------------------------------------------------------
    "precision": Key("float32", "str", "float32 | bfloat16 (bf16 compute, float32 master weights)"),
    "recompute_grad": Key(False, "bool", "rematerialise each block in the backward pass (jax.checkpoint)"),
    "tokens_per_mb_per_replica": Key(None, "int?", "tokens per microbatch per batch replica; the step accumulates gradients over the microbatches"),
    # --- kernels: speed only, never the meaning (models/kernels.py) ----------------------------
    "attention_kernel": Key("auto", "str", "auto | plain | blocked | cudnn: how attention is computed; auto: cudnn for half precision on a GPU where it applies, else blocked; plain: the reference (one score matrix)"),
    "cpu_backward": Key("auto", "str", "auto | plain: on a CPU, auto uses projection gradients written for XLA:CPU's matmul kernels and a fusion boundary on the residual stream's gradient; plain: the gradients JAX derives"),
    # --- mesh ----------------------------------------------------------------------------------
    "mesh_shape": Key("", "str", 'named device mesh, e.g. "x:4,y:2"; empty: all local devices on the batch'),
    "layout": Key("", "str", 'tensor dimension -> mesh axis, e.g. "batch:x,heads:y"'),
    # --- training ------------------------------------------------------------------------------
    "train_batch_size": Key(8, "int", "sequences per global training batch"),
    "train_steps": Key(1000, "int", "optimizer steps to train for"),
    "iterations": Key(100, "int", "steps between progress lines and metric logs"),
    "steps_per_checkpoint": Key(5000, "int", "steps between checkpoints (and evaluations); --steps_per_checkpoint overrides"),
    "keep_checkpoints": Key(3, "int", "how many of the newest checkpoints to keep"),
    "model_path": Key("", "str", "folder (local or gs://) for checkpoints, metrics and samples"),
    "model": Key("GPT", "str", 'model family: only "GPT"'),
    "seed": Key(0, "int", "seed of the initialisation, dropout and data order"),
    "log_grads": Key(False, "bool", "true: also log each parameter's gradient norm (grad_norm/<path>, e.g. grad_norm/blocks.0.attn.q) with the metrics; the global norm is always logged"),
    # --- optimizer -----------------------------------------------------------------------------
    "opt_name": Key("adam", "str", "adam (decoupled weight decay, skipping norms and biases) | adafactor"),
    "lr": Key(6e-4, "float", "peak learning rate"),
    "lr_decay": Key("cosine", "str", "cosine | linear (to 0.1 * lr over lr_decay_end steps) | none"),
    "lr_decay_end": Key(None, "int?", "step at which the decay reaches 0.1 * lr; absent: train_steps"),
    "warmup_steps": Key(0, "int", "linear warmup steps"),
    "beta1": Key(0.9, "float", "Adam beta1"),
    "beta2": Key(0.95, "float", "Adam beta2"),
    "epsilon": Key(1e-8, "float", "Adam epsilon"),
    "ada_epsilon1": Key(1e-30, "float", "Adafactor epsilon added to squared gradients"),
    "ada_epsilon2": Key(1e-3, "float", "Adafactor parameter-scale floor"),
    "weight_decay": Key(0.01, "float", "decoupled weight decay (not applied to norms and biases)"),
    "skip_nonfinite_steps": Key(False, "bool", "a step whose loss, gradient norm or updated parameters are not finite is skipped (the state stays as it was) and counted in metrics as skipped_steps; false: the run stops at such a step, saving nothing from it"),
    "gradient_clipping": Key(1.0, "float", "clip gradients to this global norm; 0 turns clipping off"),
    # --- data ----------------------------------------------------------------------------------
    "datasets": Key([], "list", "[[dataset_id, stitch, sampling_mode, weight], ...]; configs/dataset_configs/<id>.json"),
    "input_fn": Key("sequential_input", "str", "GPT-Neo's reader: sequential_input | generic_text (others are refused); neomesh reads every dataset with its one sampler (deterministic, honouring stitch, mode and weight), so a config that sets it is logged once"),
    "remove_partial_sequences": Key(False, "bool", "--predict: true writes each sample without its prompt (only the new tokens), as GPT-Neo's output without the partial sequences"),
    "shuffle_input_filenames": Key(True, "bool", "GPT-Neo shuffled the shard list when true; neomesh always shuffles examples deterministically from (seed, step), so false has no effect and is logged once"),
    "padding_id": Key(None, "int?", "padding token id; absent: the dataset config's; one >= n_vocab, or none, means eos_id (configs.special_ids)"),
    "eos_id": Key(None, "int?", "end-of-text token id; absent: the first dataset config's, else the tokenizer's (configs.special_ids)"),
    # --- evaluation ----------------------------------------------------------------------------
    "eval_batch_size": Key(8, "int", "sequences per evaluation batch"),
    "eval_steps": Key(0, "int", "evaluation batches every checkpoint (0: no evaluation while training)"),
    "eval_tasks": Key([], "list", "task evaluations (GPT-Neo: lambada); neomesh implements none yet, so a non-empty list is refused"),
    # --- sampling ------------------------------------------------------------------------------
    "predict_batch_size": Key(1, "int", "completions sampled per prompt"),
    "predict_steps": Key(0, "int", "GPT-Neo: above 0, sample from the prompt at every checkpoint while training; neomesh does not (run main.py --predict), so above 0 is logged once"),
    "predict_max_steps": Key(256, "int", "new tokens per completion (generation also stops at n_ctx)"),
    "temperature": Key(0.9, "float", "sampling temperature; 0 is greedy"),
    "top_k": Key(0, "int", "sample among the k most likely tokens; 0 turns it off"),
    "top_p": Key(1.0, "float", "nucleus sampling: the smallest set with this much probability; 1 turns it off"),
    "repetition_penalty": Key(1.0, "float", "divide positive (multiply negative) logits of tokens already present; 1 turns it off"),
    "sampling_seed": Key(0, "int", "seed of the sampler"),
}
# fmt: on

ATTENTION_KINDS = ("global", "local", "linear", "gau", "none")
INPUT_FNS = ("sequential_input", "generic_text")  # GPT-Neo's readers; neomesh has one sampler for both
EVAL_TASKS = {"lambada": False}  # GPT-Neo's task evaluations: name -> implemented in neomesh


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
    "moe_layers":              Option("mixture-of-experts layers (moe_params, moe_activation)", False, False, "no mixture of experts"),
    "entmax_loss":             Option("the entmax loss",                                       False, False, "softmax outputs only"),
    "mlm_training":            Option("the masked-LM objective (the mlm_* keys)",               True,  False, "a causal LM only"),
    "activation_function":     Option("an activation outside Hugging Face's names",            True,  False,
                                      f"ACT2FN equivalents of {', '.join(HF_ACTIVATIONS)} only"),
}
# fmt: on

SAMPLING_MODES = ("documents_random", "documents_fixed", "chunks")
DATASET_KEYS = {
    "n_vocab": Key(None, "int?", "token ids must be below this"),
    "path": Key("", "str", "glob of the training shards (local or gs://)"),
    "eval_path": Key("", "str", "glob of the evaluation shards"),
    "tokenizer_is_pretrained": Key(False, "bool", "tokenizer_path names a pretrained tokenizer (e.g. gpt2)"),
    "tokenizer_path": Key("", "str", "tokenizer.json path or pretrained name"),
    "eos_id": Key(None, "int?", "end-of-text id, joins stitched documents"),
    "padding_id": Key(None, "int?", "padding id"),
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
            "batch": self.train_batch_size,
        }

    def replace(self, **changes: Any) -> Config:
        values = self.to_dict()
        values.update(changes)
        return validate(values, self.source)


def expand_attention_types(attention_types: list | None, n_layer: int) -> list[str]:
    if attention_types is None:
        return ["global"] * n_layer
    kinds: list[str] = []
    for entry in attention_types:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not isinstance(entry[0], (list, tuple))
            or not isinstance(entry[1], int)
        ):
            raise ConfigError(
                f"attention_types: entry {entry!r} is not [[kinds...], repeat], e.g. [[\"global\", \"local\"], 6]"
            )
        kinds.extend(list(entry[0]) * entry[1])
    return kinds


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
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train_steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    check_known(key, f"--set {text}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if KEYS[key].kind.startswith("str") and not isinstance(value, str):
        value = raw  # `--set mesh_shape=8` means the string "8"
    return key, value


def check_known(key: str, where: str) -> None:
    if key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "; see KEYS in configs.py for the known keys"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


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
        "bool": isinstance(value, bool) or value in (0, 1),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "any": True,
    }[base]
    if not ok:
        raise ConfigError(f"{where}: key {key!r} has {value!r} ({type(value).__name__}); it takes a {base}")
    if base == "float":
        return float(value)
    if base == "bool":
        return bool(value)
    return value


def validate(raw: dict[str, Any], source: str) -> Config:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check_known(key, source)
        values[key] = check_type(key, value, KEYS[key].kind, source)
    for key, spec in KEYS.items():
        values.setdefault(key, json.loads(json.dumps(spec.default)))

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: key {key!r} = {values[key]!r}: {message}")

    for key in ("n_ctx", "n_embd", "n_head", "n_layer", "n_vocab", "train_batch_size", "eval_batch_size",
                "predict_batch_size", "iterations", "steps_per_checkpoint", "keep_checkpoints",
                "local_attention_radius"):
        if values[key] <= 0:
            fail(key, "must be a positive integer")
    for key in ("train_steps", "eval_steps", "warmup_steps", "num_mem_kv", "top_k", "predict_max_steps",
                "predict_steps"):
        if values[key] < 0:
            fail(key, "must be zero or more")
    if values["n_embd"] % values["n_head"]:
        fail("n_embd", f"must divide evenly by n_head = {values['n_head']} (head size n_embd / n_head)")
    kinds = expand_attention_types(values["attention_types"], values["n_layer"])
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
    if unknown:
        fail("attention_types", f"unknown kind {unknown[0]!r}; accepted: {', '.join(ATTENTION_KINDS)}")
    if len(kinds) != values["n_layer"]:
        fail("attention_types", f"expands to {len(kinds)} layers but n_layer = {values['n_layer']}")
    for key, accepted in (
        ("precision", ("float32", "bfloat16")),
        ("opt_name", ("adam", "adafactor")),
        ("lr_decay", ("cosine", "linear", "none")),
        ("model", ("GPT",)),
        ("attention_kernel", ("auto", "plain", "blocked", "cudnn")),
        ("cpu_backward", ("auto", "plain")),
        ("input_fn", INPUT_FNS),
    ):
        if values[key] not in accepted:
            fail(key, f"accepted: {', '.join(accepted)}")
    from models.activations import ACTIVATIONS

    if values["activation_function"] not in ACTIVATIONS:
        close = difflib.get_close_matches(values["activation_function"], ACTIVATIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        fail("activation_function", f"unknown activation{hint} (accepted: {', '.join(sorted(ACTIVATIONS))})")
    for task in values["eval_tasks"]:
        if task not in EVAL_TASKS:
            fail("eval_tasks", f"unknown task {task!r}; GPT-Neo's tasks: {', '.join(EVAL_TASKS)}")
        if not EVAL_TASKS[task]:
            fail("eval_tasks", f"task evaluation ({task!r}) is not implemented in neomesh yet; accepted: []")
    for key in ("embed_dropout", "attn_dropout", "res_dropout"):
        if not 0.0 <= values[key] < 1.0:
            fail(key, "a dropout rate must be in [0, 1)")
    for key in ("z_loss", "lr", "weight_decay", "gradient_clipping", "temperature"):
        if values[key] < 0:
            fail(key, "must be zero or more")
    if not 0.0 < values["top_p"] <= 1.0:
        fail("top_p", "must be in (0, 1]")
    if values["repetition_penalty"] <= 0:
        fail("repetition_penalty", "must be positive (1 turns it off)")
    for key in ("intermediate_size", "gau_key_size", "gau_expanded_size"):
        if values[key] is not None and values[key] <= 0:
            fail(key, "must be a positive integer")
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
            fail("axial_pos_emb", f"a1 * a2 = {axial[0] * axial[1]} but n_ctx = {values['n_ctx']}: they must be equal")
    tokens_per_mb = values["tokens_per_mb_per_replica"]
    if tokens_per_mb is not None and tokens_per_mb <= 0:
        fail("tokens_per_mb_per_replica", "must be a positive integer")
    for entry in values["datasets"]:
        check_dataset_entry(entry, source)
    if values["mlm_training"]:
        check_masked_lm(values, fail)

    from mesh import parse_layout, parse_mesh_shape

    mesh_axes = parse_mesh_shape(values["mesh_shape"], source)
    parse_layout(values["layout"], mesh_axes, source)
    return Config(values, source)  # refuses options not implemented yet


def check_masked_lm(values: dict[str, Any], fail) -> None:
    """The mlm_* keys of a config with mlm_training (inputs.MaskedLM reads them)."""
    n_vocab = values["n_vocab"]
    if values["mlm_mask_id"] is None:
        fail("mlm_mask_id", f"mlm_training needs the id of its mask token: an id below n_vocab = {n_vocab}")
    for key in ("mlm_mask_id", "mlm_cls_token_id"):
        if values[key] is not None and not 0 <= values[key] < n_vocab:
            fail(key, f"must be a token id: 0 <= id < n_vocab = {n_vocab}")
    if values["mlm_cls_token_id"] == values["mlm_mask_id"]:
        fail("mlm_cls_token_id", "must differ from mlm_mask_id")
    for key in ("mlm_mask_prob", "mlm_same_token_prob", "mlm_random_token_prob"):
        if not 0.0 <= values[key] <= 1.0:
            fail(key, "a probability must be in [0, 1]")
    if values["mlm_same_token_prob"] + values["mlm_random_token_prob"] > 1.0:
        fail("mlm_random_token_prob", f"plus mlm_same_token_prob = {values['mlm_same_token_prob']} exceeds 1: they are "
                                      "shares of the masked positions (the rest show mlm_mask_id)")
    ignored = values["mlm_mask_ignore_ids"] or []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ignored):
        fail("mlm_mask_ignore_ids", "must be a list of token ids (integers >= 0)")
    if values["mlm_cls_token_id"] is not None and values["n_ctx"] < 2:
        fail("n_ctx", "must be at least 2 with mlm_cls_token_id: the CLS token takes the first position")
    if values["entmax_loss"]:
        fail("entmax_loss", "the masked-LM loss is softmax cross-entropy only; accepted with mlm_training: false")


def check_dataset_entry(entry: Any, source: str) -> None:
    example = '["mydata", 25, "documents_random", 1.0]'
    if not isinstance(entry, list) or len(entry) != 4:
        raise ConfigError(f"{source}: key 'datasets' has entry {entry!r}; each entry is [id, stitch, mode, weight], e.g. {example}")
    dataset_id, stitch, mode, weight = entry
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ConfigError(f"{source}: key 'datasets' entry {entry!r}: the id must be a non-empty string")
    if not isinstance(stitch, int) or isinstance(stitch, bool) or stitch <= 0:
        raise ConfigError(f"{source}: key 'datasets' entry {entry!r}: stitch must be a positive integer")
    if mode not in SAMPLING_MODES:
        raise ConfigError(f"{source}: key 'datasets' entry {entry!r}: sampling mode {mode!r} is not one of {', '.join(SAMPLING_MODES)}")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ConfigError(f"{source}: key 'datasets' entry {entry!r}: weight must be a positive number")


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
    stitch: int
    mode: str
    weight: float


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
