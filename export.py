"""Hugging Face interop: export a checkpoint to GPTNeoForCausalLM, import one from it.

    python export.py --model M --to_hf OUT_DIR [--step N] [--set key=value ...]
    python export.py --from_hf HF_DIR --model_path OUT_DIR --config_out configs/NAME.json
    python export.py --model M --to_hf OUT_DIR --merge_lora     # a LoRA fine-tune, merged
    python export.py --model M --to_peft OUT_DIR                # its adapters, for the peft library
    python export.py --model M --prune_vocab --keep_from CORPUS --model_path OUT_DIR --config_out configs/NAME.json

Export writes `config.json`, `model.safetensors` and the tokenizer (`tokenizer.json`,
`tokenizer_config.json`) that `GPTNeoForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load. Import turns such a folder (for example EleutherAI's released
125M / 1.3B / 2.7B weights) into a step-0, parameters-only checkpoint in model_path, the tokenizer
beside it, and a config from which training, fine-tuning and `--predict` continue.

The two models are the same architecture (design §6): HF GPTNeo's `window_size` is our
`local_attention_radius` (query i sees key j when 0 <= i - j < window), neither scales q.k by
1/sqrt(d), the output projection is the token embedding. What differs is only how each stores a
weight: the `MAPPING` table below is the whole correspondence.

Vocabulary padded for speed (n_vocab larger than the tokenizer): every row is exported, and the
HF config's `vocab_size` is n_vocab, so import(export(x)) is bitwise and HF's logits have the same
width as ours. The tokenizer never produces the extra ids; HF's tokenizer and `generate` accept a
vocab_size above the tokenizer's length (tests/test_export.py runs both on such a model).

Only safetensors are read or written: a `pytorch_model.bin` (a pickle) is refused.

LoRA fine-tunes (models/lora.py) export two ways: `--merge_lora` folds each A.B into its weight
and writes a plain GPTNeo folder; `--to_peft` writes the adapters alone as peft's LoRA folder
(`adapter_config.json`, `adapter_model.safetensors`), to load with
`PeftModel.from_pretrained(GPTNeoForCausalLM.from_pretrained(BASE), OUT_DIR)` onto the base
exported by `--to_hf` of the base (the same config with `--set lora_rank=0`). Prompt and prefix
tuning have no GPTNeo form and are refused.

`--prune_vocab` (vocab_pruning.py) writes a new model whose vocabulary holds only the tokens a corpus
uses (plus the specials and single bytes), with its tokenizer and config; `--to_hf` exports it as any other.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

import storage
from configs import HF_ACTIVATIONS, Config, load_config, options_in_use, special_ids, validate
from errors import USER_ERRORS, ConfigError, ExportError, report_user_error

log = logging.getLogger("neomesh")

# --- the mapping ------------------------------------------------------------------------------
# One row per parameter: our path in the parameter tree (models/gpt2.py `weights`; `{i}` is the
# block), the Hugging Face tensor name, and how the array changes on the way to HF:
#   same       identical array
#   linear     ours [in, out]            <-> HF nn.Linear weight [out, in]            (transpose)
#   heads_in   ours [embd, heads, kv]    <-> HF [heads*kv, embd] (q, k, v projections)
#   heads_out  ours [heads, kv, embd]    <-> HF [embd, heads*kv] (attention output projection)
# HF's lm_head.weight is not stored: it is tied to transformer.wte.weight, as our output is to wte.

# fmt: off
MAPPING = [
    ("wte",                      "transformer.wte.weight",                          "same"),
    ("wpe",                      "transformer.wpe.weight",                          "same"),
    ("blocks.{i}.ln_1.scale",    "transformer.h.{i}.ln_1.weight",                   "same"),
    ("blocks.{i}.ln_1.bias",     "transformer.h.{i}.ln_1.bias",                     "same"),
    ("blocks.{i}.attn.q",        "transformer.h.{i}.attn.attention.q_proj.weight",  "heads_in"),
    ("blocks.{i}.attn.k",        "transformer.h.{i}.attn.attention.k_proj.weight",  "heads_in"),
    ("blocks.{i}.attn.v",        "transformer.h.{i}.attn.attention.v_proj.weight",  "heads_in"),
    ("blocks.{i}.attn.out",      "transformer.h.{i}.attn.attention.out_proj.weight", "heads_out"),
    ("blocks.{i}.attn.out_bias", "transformer.h.{i}.attn.attention.out_proj.bias",  "same"),
    ("blocks.{i}.ln_2.scale",    "transformer.h.{i}.ln_2.weight",                   "same"),
    ("blocks.{i}.ln_2.bias",     "transformer.h.{i}.ln_2.bias",                     "same"),
    ("blocks.{i}.mlp.fc",        "transformer.h.{i}.mlp.c_fc.weight",               "linear"),
    ("blocks.{i}.mlp.fc_bias",   "transformer.h.{i}.mlp.c_fc.bias",                 "same"),
    ("blocks.{i}.mlp.proj",      "transformer.h.{i}.mlp.c_proj.weight",             "linear"),
    ("blocks.{i}.mlp.proj_bias", "transformer.h.{i}.mlp.c_proj.bias",               "same"),
    ("ln_f.scale",               "transformer.ln_f.weight",                         "same"),
    ("ln_f.bias",                "transformer.ln_f.bias",                           "same"),
]
# fmt: on

# (to HF, from HF given our shape); every one only transposes and reshapes, so bits are kept
TRANSFORMS = {
    "same": (lambda x: x, lambda x, shape: x),
    "linear": (lambda x: x.T, lambda x, shape: x.T),
    "heads_in": (lambda x: x.reshape(x.shape[0], -1).T, lambda x, shape: x.T.reshape(shape)),
    "heads_out": (lambda x: x.reshape(-1, x.shape[-1]).T, lambda x, shape: x.T.reshape(shape)),
}

# activation_function: ours -> HF (ACT2FN names); the table lives beside configs.OPTIONS
ACTIVATIONS_TO_HF = HF_ACTIVATIONS
# HF -> ours: the inverse, plus HF's other names for the tanh-form GELU
ACTIVATIONS_FROM_HF = {hf: ours for ours, hf in ACTIVATIONS_TO_HF.items()} | {
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu_python_tanh": "gelu",
}

# buffers some HF checkpoints store (the attention masks): rebuilt from the config, never read
HF_BUFFER_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # loads tokenizer.json exactly as written


def expanded_mapping(config) -> list[tuple[tuple, str, str]]:
    """MAPPING with `{i}` expanded over the blocks: (our path as keys, HF name, transform)."""
    rows = []
    for ours, hf, transform in MAPPING:
        layers = range(config.n_layer) if "{i}" in ours else [None]
        for i in layers:
            path = tuple(int(part) if part.isdigit() else part for part in ours.format(i=i).split("."))
            rows.append((path, hf.format(i=i), transform))
    return rows


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


# --- what HF GPTNeo can express ------------------------------------------------------------------


def check_exportable(config) -> None:
    """Refuse, by name, every option GPTNeoForCausalLM has no place for (the `hf` column of
    configs.OPTIONS)."""
    for _, option, use in options_in_use(config):
        if not option.hf:
            raise ExportError(f"{config.source}: {use}: Hugging Face GPTNeo cannot express {option.what} (it has "
                              f"{option.hf_lacks}); this model cannot be exported")


# --- export ----------------------------------------------------------------------------------------


def check_adapters_exportable(config, merge_lora: bool) -> None:
    """A fine-tuned model exports as HF GPTNeo only as LoRA merged into its weights."""
    for key in ("prompt_tuning_tokens", "prefix_tuning"):
        if getattr(config, key):
            raise ExportError(f"{config.source}: key {key!r} = {getattr(config, key)!r}: Hugging Face GPTNeo has no "
                              "place for prompt or prefix tuning's weights; this model cannot be exported")
    if config.lora_rank and not merge_lora:
        raise ExportError(f"{config.source}: key 'lora_rank' = {config.lora_rank}: a LoRA fine-tune exports with "
                          "--merge_lora (merged weights) or as adapters with --to_peft OUT_DIR")
    if merge_lora and not config.lora_rank:
        raise ExportError(f"{config.source}: --merge_lora: key 'lora_rank' = 0, there is no LoRA to merge")


def restore_single_device(config, step: int | None):
    """(params, step) of the newest (or a given) checkpoint, gathered on one device."""
    import jax

    from checkpoints import restore_params
    from mesh import build_mesh_layout

    single = config.replace(mesh_shape="", layout="", fsdp_axes="")
    return restore_params(single, build_mesh_layout(single, jax.devices()[:1]), step)


def export_to_hf(config, out_dir, step: int | None = None, merge_lora: bool = False) -> Path:
    """The newest (or a given) checkpoint in config.model_path -> an HF GPTNeoForCausalLM folder;
    with merge_lora, a LoRA fine-tune's adapters folded into the weights (models/lora.py `merged`)."""
    from safetensors.numpy import save

    from models import lora

    check_adapters_exportable(config, merge_lora)
    check_exportable(config)
    params, step = restore_single_device(config, step)
    if merge_lora:
        params = lora.merged(params, config)
    out = str(out_dir)  # a local folder or gs://...: every file goes through storage
    storage.makedirs(out)

    eos_id, padding_id = export_tokenizer(config, out)
    tensors = {}
    for path, hf_name, transform in expanded_mapping(config):
        to_hf, _ = TRANSFORMS[transform]
        tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(get_path(params, path), dtype=np.float32)))
    storage.write_bytes(storage.join(out, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    storage.write_text(storage.join(out, "config.json"), json.dumps(hf_config(config, eos_id, padding_id), indent=2) + "\n")
    log.info("exported step %d of %s to %s", step, config.model_path, out)
    return Path(out) if not storage.is_remote(out) else out


def hf_config(config, eos_id: int | None, padding_id: int | None) -> dict:
    """Our config -> GPTNeoConfig's config.json."""
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": config.n_vocab,
        "max_position_embeddings": config.n_ctx,
        "hidden_size": config.n_embd,
        "num_layers": config.n_layer,
        "num_heads": config.n_head,
        "attention_types": config.attention_types or [[["global"], config.n_layer]],
        "window_size": config.local_attention_radius,
        "intermediate_size": config.mlp_width,
        "activation_function": ACTIVATIONS_TO_HF[config.activation_function],
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "embed_dropout": config.embed_dropout,
        "attention_dropout": config.attn_dropout,
        "resid_dropout": config.res_dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": padding_id,
        "dtype": "float32",
    }


def export_tokenizer(config, out: str) -> tuple[int | None, int | None]:
    """Write the config's dataset tokenizer as tokenizer.json + tokenizer_config.json; returns
    (eos_id, padding_id) by configs.special_ids, as training and sampling choose them. A model
    without a findable tokenizer is still exported (weights and config), with a warning."""
    from encoders import load_dataset_tokenizer

    try:
        tokenizer = load_dataset_tokenizer(config)
    except ConfigError as err:
        log.warning("no tokenizer exported (%s); config.json and model.safetensors are written", err)
        return special_ids(config)
    eos_id, padding_id = special_ids(config, tokenizer)
    if tokenizer.vocab_size > config.n_vocab:
        raise ExportError(
            f"{config.source}: key 'n_vocab' = {config.n_vocab} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({tokenizer.source})"
        )
    storage.write_text(storage.join(out, "tokenizer.json"), tokenizer.tokenizer.to_str())
    token = tokenizer.tokenizer.id_to_token
    settings = {
        "tokenizer_class": TOKENIZER_CLASS,
        "model_max_length": config.n_ctx,
        "clean_up_tokenization_spaces": False,
    }
    if eos_id is not None:
        settings |= {"eos_token": token(eos_id), "bos_token": token(eos_id)}
    if padding_id is not None:
        settings["pad_token"] = token(padding_id)
    storage.write_text(storage.join(out, "tokenizer_config.json"), json.dumps(settings, indent=2) + "\n")
    return eos_id, padding_id


# --- LoRA adapters as a peft folder ----------------------------------------------------------------

# our target -> (the HF module it adapts, how many leading dimensions of A are its input)
PEFT_MODULES = {
    "q": ("attn.attention.q_proj", 1),
    "k": ("attn.attention.k_proj", 1),
    "v": ("attn.attention.v_proj", 1),
    "out": ("attn.attention.out_proj", 2),
    "fc": ("mlp.c_fc", 1),
    "proj": ("mlp.c_proj", 1),
}
PEFT_PREFIX = "base_model.model.transformer.h"  # how peft names a GPTNeoForCausalLM's layers


def export_peft(config, out_dir, step: int | None = None) -> Path:
    """A LoRA fine-tune's adapters -> peft's LoRA folder for HF GPTNeo. peft computes
    x.lora_A^T.lora_B^T * lora_alpha / r beside a Linear's x.W^T; ours x.A.B with the same scale, so
    lora_A = A^T [r, in] and lora_B = B^T [out, r], flattened where our factors keep (heads, kv)."""
    from safetensors.numpy import save

    check_exportable(config)
    if not config.lora_rank or config.prompt_tuning_tokens or config.prefix_tuning:
        raise ExportError(f"{config.source}: --to_peft writes LoRA adapters only: this config needs lora_rank > 0 "
                          "and neither prompt_tuning_tokens nor prefix_tuning")
    unsupported = [t for t in config.lora_targets if t not in PEFT_MODULES]
    if unsupported:
        raise ExportError(f"{config.source}: key 'lora_targets': {', '.join(unsupported)} has no GPTNeo module; "
                          f"exportable: {', '.join(PEFT_MODULES)}")
    params, step = restore_single_device(config, step)
    tensors = {}
    for i, block in enumerate(params["blocks"]):
        for target in config.lora_targets:
            module, inputs = PEFT_MODULES[target]
            part = block["attn" if module.startswith("attn") else "mlp"]
            a = np.asarray(part[f"{target}_lora_a"], np.float32)
            b = np.asarray(part[f"{target}_lora_b"], np.float32)
            name = f"{PEFT_PREFIX}.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, config.lora_rank).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(config.lora_rank, -1).T)
    from checkpoints import base_name, resolve_base

    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(PEFT_MODULES[t][0].rsplit(".", 1)[1] for t in config.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_name(resolve_base(config), config),
    }
    out = str(out_dir)
    storage.makedirs(out)
    storage.write_bytes(storage.join(out, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
    storage.write_text(storage.join(out, "adapter_config.json"), json.dumps(adapter_config, indent=2) + "\n")
    log.info("exported the LoRA adapters of step %d of %s to %s", step, config.model_path, out)
    return Path(out) if not storage.is_remote(out) else out


# --- import ----------------------------------------------------------------------------------------


def import_from_hf(hf_dir, model_path, config_out) -> Config:
    """An HF GPTNeo folder -> a step-0 checkpoint in model_path, its tokenizer there, and a config at
    config_out (with a dataset config beside it that names the tokenizer); returns the config."""
    import tempfile

    import jax
    import jax.numpy as jnp

    from checkpoints import CheckpointMeta, Checkpoints
    from models import gpt2

    source, model_path = str(hf_dir), str(model_path)
    if storage.is_remote(source):  # safetensors and tokenizers read local files: fetch the folder once
        download = tempfile.TemporaryDirectory(prefix="neomesh-hf-")
        hf_dir = Path(storage.copy_to_local(source, download.name))
    hf_dir, config_out = Path(hf_dir), Path(config_out)
    hf = read_hf_config(hf_dir)
    dataset_config = check_new_model_destination(model_path, config_out)
    values = config_values(hf, hf_dir, model_path)
    tensors = read_safetensors(hf_dir)  # refuses a pickle before anything is written
    tokenizer_name = "tokenizer.json" if has_tokenizer(hf_dir) else None
    if tokenizer_name:  # a dataset config beside config_out names the tokenizer, for --predict
        values["datasets"] = [[dataset_config.stem, max(1, math.ceil(values["n_ctx"] / 100)), "documents_random", 1.0]]
    config = validate(values, str(config_out))

    described = gpt2.weights(config)
    params = jax.tree.map(lambda weight: None, described, is_leaf=gpt2.is_weight)  # filled below
    for path, hf_name, transform in expanded_mapping(config):
        if hf_name not in tensors:
            raise ExportError(f"{hf_dir}: the safetensors hold no tensor {hf_name!r}, which config.json's shape needs")
        to_hf, from_hf = TRANSFORMS[transform]
        shape = gpt2.shape_of(get_path(described, path), config)
        array = tensors.pop(hf_name)
        expected_hf = to_hf(np.empty(shape, np.float32)).shape
        if tuple(array.shape) != tuple(expected_hf):
            raise ExportError(f"{hf_dir}: tensor {hf_name!r} has shape {tuple(array.shape)}; config.json implies "
                              f"{tuple(expected_hf)}")
        set_path(params, path, jnp.asarray(from_hf(array, shape)))
    check_leftovers(tensors, params, hf_dir)

    if tokenizer_name:
        import_tokenizer(hf_dir, storage.join(model_path, tokenizer_name))
        write_dataset_config(dataset_config, values, storage.join(model_path, tokenizer_name))
    else:
        log.warning("%s has no tokenizer (tokenizer.json, or vocab.json + merges.txt); --predict needs one: "
                    "name it as tokenizer_path in a dataset config", hf_dir)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    config_out.write_text(json.dumps(values, indent=2) + "\n")
    checkpoints = Checkpoints(model_path, asynchronous=False)
    meta = CheckpointMeta.for_config(config, 0, params_only=True, imported_from=storage.absolute(source))
    checkpoints.save(0, {"params": params, "opt_state": None}, meta)
    checkpoints.close()
    log.info("imported %s into %s (step 0); config %s", source, model_path, config_out)
    return load_config(str(config_out))


def check_new_model_destination(model_path: str, config_out: Path) -> Path:
    """Refuse a model_path that holds checkpoints or a config_out (or the dataset config beside it)
    that exists: a new model is written into fresh places. Returns that dataset config's path."""
    checkpoints_dir = storage.join(model_path, "checkpoints")
    if any(name.isdigit() for name in storage.listdir(checkpoints_dir)):
        raise ExportError(f"--model_path {model_path}: {checkpoints_dir} already holds checkpoints; write into "
                          "an empty folder so that step 0 is the newest checkpoint")
    dataset_config = config_out.parent / "dataset_configs" / f"{config_out.stem}.json"
    for existing in (config_out, dataset_config):
        if existing.exists():
            raise ExportError(f"--config_out {config_out}: {existing} exists; choose another name or remove it")
    return dataset_config


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"--from_hf {hf_dir}: no config.json; expected a folder written by save_pretrained")
    hf = json.loads(path.read_text())
    if hf.get("model_type") != "gpt_neo":
        raise ExportError(f"{path}: model_type is {hf.get('model_type')!r}; only GPTNeo ('gpt_neo') imports")
    return hf


def config_values(hf: dict, hf_dir: Path, model_path: str) -> dict:
    """GPTNeoConfig's config.json -> our config keys (the shape, attention, activation and eps); a key
    config.json leaves out takes GPTNeoConfig's default, as from_pretrained would."""
    where = hf_dir / "config.json"
    if not hf.get("tie_word_embeddings", True):
        raise ExportError(f"{where}: tie_word_embeddings is false; neomesh's model ties lm_head to wte")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS_FROM_HF:
        why = " (HF's 'gelu' is the exact erf form; neomesh's gelu is the tanh form, HF's 'gelu_new')"
        raise ExportError(f"{where}: activation_function {activation!r} has no neomesh equivalent"
                          f"{why if activation == 'gelu' else ''}; importable: {', '.join(ACTIVATIONS_FROM_HF)}")
    n_embd = hf.get("hidden_size", 2048)
    values = {
        "n_vocab": hf.get("vocab_size", 50257),
        "n_ctx": hf.get("max_position_embeddings", 2048),
        "n_embd": n_embd,
        "n_layer": hf.get("num_layers", 24),
        "n_head": hf.get("num_heads", 16),
        "attention_types": hf.get("attention_types") or [[["global", "local"], 12]],
        "local_attention_radius": hf.get("window_size", 256),
        "activation_function": ACTIVATIONS_FROM_HF[activation],
        "intermediate_size": hf.get("intermediate_size"),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        "embed_dropout": hf.get("embed_dropout", 0.0),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "res_dropout": hf.get("resid_dropout", 0.0),
        "model_path": model_path,
        "eos_id": hf.get("eos_token_id", 50256),
        "padding_id": hf.get("pad_token_id"),
    }
    if values["intermediate_size"] == 4 * n_embd:
        values["intermediate_size"] = None  # our default, said once
    if isinstance(values["eos_id"], list):
        values["eos_id"] = values["eos_id"][0]
    return values


def read_safetensors(hf_dir: Path) -> dict:
    """Every tensor of model.safetensors (or its shards) as a float32 numpy array, by HF name."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({hf_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        pickles = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
        found = f" (found {', '.join(pickles)}: a pickle, which neomesh never loads)" if pickles else ""
        raise ExportError(
            f"--from_hf {hf_dir}: no model.safetensors{found}. Convert it once where you trust the file: "
            "GPTNeoForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="np") as f:
            names = [name for name in f.keys() if not name.endswith(HF_BUFFER_SUFFIXES)]
            numpy_names = [n for n in names if f.get_slice(n).get_dtype() != "BF16"]
            for name in numpy_names:
                tensors[name] = f.get_tensor(name).astype(np.float32, copy=False)
        if len(numpy_names) < len(names):  # numpy has no bfloat16: read those through jax
            import jax.numpy as jnp

            with safe_open(str(file), framework="flax") as f:
                for name in set(names) - set(numpy_names):
                    tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    # a checkpoint of GPTNeoModel (no LM head) names its tensors without the "transformer." prefix
    return {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": array
            for name, array in tensors.items()}


def check_leftovers(tensors: dict, params: dict, hf_dir: Path) -> None:
    """Tensors the mapping did not take: a tied lm_head must equal wte; any other refuses."""
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, np.asarray(params["wte"])):
        raise ExportError(f"{hf_dir}: lm_head.weight differs from transformer.wte.weight; neomesh's output "
                          "projection is tied to the token embedding")
    if tensors:
        raise ExportError(f"{hf_dir}: tensors that GPTNeo's layout does not have: {', '.join(sorted(tensors)[:5])}")


def has_tokenizer(hf_dir: Path) -> bool:
    return (hf_dir / "tokenizer.json").is_file() or all((hf_dir / f).is_file() for f in ("vocab.json", "merges.txt"))


def import_tokenizer(hf_dir: Path, target: str) -> None:
    """Write the HF folder's tokenizer to target (a tokenizer.json, local or gs://): copied when the
    folder has one, else built from vocab.json + merges.txt the way HF's GPT-2 tokenizer builds it."""
    if (hf_dir / "tokenizer.json").is_file():
        storage.write_bytes(target, (hf_dir / "tokenizer.json").read_bytes())
        return
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    settings_file = hf_dir / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    add_prefix_space = bool(settings.get("add_prefix_space", False))
    tokenizer = Tokenizer(models.BPE.from_file(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token and tokenizer.token_to_id(token) is not None and token not in specials:
            specials.append(token)
    if tokenizer.token_to_id("<|endoftext|>") is not None and "<|endoftext|>" not in specials:
        specials.append("<|endoftext|>")
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials])
    storage.write_text(target, tokenizer.to_str())


def write_dataset_config(path: Path, values: dict, tokenizer_path: str) -> None:
    """A dataset config naming the imported tokenizer, so --predict finds it; `path` is where
    fine-tuning shards go (none yet: training says so until shards are there or `path` is edited)."""
    dataset = {
        "n_vocab": values["n_vocab"],
        "path": storage.join(values["model_path"], "data", "*.tfrecords"),
        "eval_path": "",
        "tokenizer_is_pretrained": False,
        "tokenizer_path": tokenizer_path,
        "eos_id": values["eos_id"],
        "padding_id": values["padding_id"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset, indent=2) + "\n")


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="config name (configs/NAME.json) or a .json path, for --to_hf")
    parser.add_argument("--to_hf", metavar="OUT_DIR", help="export the newest checkpoint of --model to this folder")
    parser.add_argument("--step", type=int, help="export (or prune) this step instead of the newest")
    parser.add_argument("--merge_lora", action="store_true",
                        help="with --to_hf: fold a LoRA fine-tune's adapters into the exported weights")
    parser.add_argument("--to_peft", metavar="OUT_DIR",
                        help="write the LoRA adapters of --model as a peft folder (adapter_config.json, "
                             "adapter_model.safetensors)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--from_hf", metavar="HF_DIR", help="import an HF GPTNeo folder (safetensors)")
    parser.add_argument("--prune_vocab", action="store_true",
                        help="write --model pruned to the tokens --keep_from uses into --model_path and --config_out")
    parser.add_argument("--keep_from", metavar="CORPUS_OR_TOKENIZER",
                        help="for --prune_vocab: a corpus file or folder (the data tools' formats), or a tokenizer "
                             ".json file whose tokens (by string) are kept")
    parser.add_argument("--model_path", help="for --from_hf and --prune_vocab: where the new checkpoint goes")
    parser.add_argument("--config_out", help="for --from_hf and --prune_vocab: the config to write, e.g. "
                                             "configs/neo125m.json")
    args = parser.parse_args(argv)
    from metrics import setup_logging

    setup_logging()
    try:
        if args.prune_vocab:
            if not (args.model and args.keep_from and args.model_path and args.config_out) or args.to_hf \
                    or args.to_peft or args.from_hf:
                parser.error("--prune_vocab takes --model M --keep_from CORPUS_OR_TOKENIZER --model_path DIR "
                             "--config_out FILE [--step N]")
            from vocab_pruning import prune_vocab

            config = prune_vocab(load_config(args.model, args.set), args.keep_from, args.model_path,
                                 args.config_out, args.step)
            print(f"pruned to {config.n_vocab} tokens in {args.model_path}; fine-tune or predict with --model "
                  f"{args.config_out} (shards encoded with {args.model_path}/tokenizer.json)")
        elif args.to_hf and args.model and not args.from_hf and not args.to_peft:
            out = export_to_hf(load_config(args.model, args.set), args.to_hf, args.step, args.merge_lora)
            print(f"exported to {out}")
        elif args.to_peft and args.model and not args.from_hf and not args.to_hf:
            out = export_peft(load_config(args.model, args.set), args.to_peft, args.step)
            print(f"exported the LoRA adapters to {out}")
        elif args.from_hf and args.model_path and args.config_out and not args.to_hf:
            import_from_hf(args.from_hf, args.model_path, args.config_out)
            print(f"imported to {args.model_path}; train, fine-tune or predict with --model {args.config_out}")
        else:
            parser.error("use one of --model M --to_hf OUT_DIR [--merge_lora], --model M --to_peft OUT_DIR, "
                         "--from_hf HF_DIR --model_path DIR --config_out FILE, or --model M --prune_vocab "
                         "--keep_from CORPUS_OR_TOKENIZER --model_path DIR --config_out FILE")
    except USER_ERRORS as err:  # as main.py: one `error:` line, exit code 2
        return report_user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
