"""Vocabulary pruning: a model and its tokenizer cut down to the tokens a corpus uses.

    python export.py --model M --prune_vocab --keep_from CORPUS_OR_TOKENIZER \
                     --model_path OUT_DIR --config_out configs/NAME.json [--step N]

The kept tokens are those the corpus encodes to (a file or folder of any format the data tools
read, data/corpus.py), or, when --keep_from names a `.json` tokenizer file, the tokens of the
model's tokenizer that that tokenizer also holds (by token string); always also every added
(special) token, the 256 single bytes, so that any text still encodes (in more tokens), every id
a config key names (eos_id, padding_id, the MLM ids), and the parts of every merge that makes a
kept token (so that BPE reaches each kept token as before: see `closed_under_merges`).

The new tokenizer is the old one with the kept tokens renumbered densely in their old order and
the merges whose result is kept; text of the kept corpus encodes to exactly the old ids mapped
old -> new, which the tool checks by encoding the corpus both ways. The model keeps the rows of
every weight with a `vocab` dimension (the token embedding, and the separate lm_head with its
bias under no_weight_tie) at the kept ids, so its logits are the old logits restricted to the
kept rows. Rows past the tokenizer (a vocabulary padded for speed) are dropped unless a config
key names them: n_vocab becomes the kept count.

Written to OUT_DIR (local or gs://): a step-0, parameters-only checkpoint, `tokenizer.json` and
`vocab_map.json` (old -> new ids); to --config_out: the config (the old one's keys with n_vocab,
model_path, the ids and `datasets` changed) and beside it dataset_configs/NAME.json naming the new
tokenizer. Its shards, at OUT_DIR/data/*.tfrecords, must be encoded with the new tokenizer: the old
shards' ids mean other tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import storage
from configs import KEYS, special_ids, validate
from errors import ConfigError, DataError, ExportError

log = logging.getLogger("neomesh")

TOKENIZER_FILE = "tokenizer.json"
MAP_FILE = "vocab_map.json"
ENCODE_BATCH = 256  # documents encoded at a time: a large corpus is never held whole
# config keys holding a token id: each named id keeps its row and is renumbered
TOKEN_ID_KEYS = [key for key, spec in KEYS.items() if spec.accepts == "[0, n_vocab)"] + ["padding_id"]


# --- the tokenizer ----------------------------------------------------------------------------------


def byte_level_spec(tokenizer) -> dict:
    """The tokenizer's JSON, when it is a byte-level BPE whose kept tokens can be renumbered; else an
    ExportError naming what it is."""
    from encoders import _byte_level_alphabet

    spec = json.loads(tokenizer.tokenizer.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    post = spec.get("post_processor")
    accepted = ("--prune_vocab prunes a byte-level BPE tokenizer.json (a BPE model, a ByteLevel pre-tokenizer, "
                "every single byte in the vocabulary), as data/train_tokenizer.py writes and GPT-2's is")
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer {tokenizer.source}: its model is {model.get('type')!r}; {accepted}")
    if not any(p.get("type") == "ByteLevel" for p in pres):
        raise ExportError(f"tokenizer {tokenizer.source}: its pre-tokenizer is {pre.get('type')!r}, not "
                          f"ByteLevel; {accepted}")
    missing = [char for char in _byte_level_alphabet() if char not in model["vocab"]]
    if missing:
        raise ExportError(f"tokenizer {tokenizer.source}: {len(missing)} of the 256 single bytes are not in its "
                          f"vocabulary; {accepted}")
    if post is not None and post.get("type") != "ByteLevel":
        raise ExportError(f"tokenizer {tokenizer.source}: its post-processor {post.get('type')!r} names token ids, "
                          "which --prune_vocab does not renumber; remove it (none or ByteLevel is pruned)")
    return spec


def merge_parts(merge) -> tuple[str, str]:
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def closed_under_merges(spec: dict, kept: np.ndarray) -> np.ndarray:
    """`kept` (a mask over ids) with both parts of every merge whose result is kept, until nothing
    changes. BPE reaches a token through the tokens its merges make on the way, not all of which end
    up in an encoding; with them kept, every merge a kept corpus's encoding applies survives, and the
    pruned BPE, whose merges are a subsequence of the old in the same order, takes the same steps."""
    vocab = spec["model"]["vocab"]
    made_from: dict[int, list[tuple[int, int]]] = {}
    for merge in spec["model"]["merges"]:
        left, right = merge_parts(merge)
        if left + right in vocab and left in vocab and right in vocab:
            made_from.setdefault(vocab[left + right], []).append((vocab[left], vocab[right]))
    kept = kept.copy()
    pending = list(np.flatnonzero(kept))
    while pending:
        for parts in made_from.get(int(pending.pop()), ()):
            for part in parts:
                if not kept[part]:
                    kept[part] = True
                    pending.append(part)
    return kept


def kept_token_mask(spec: dict, used_ids, n_ids: int) -> np.ndarray:
    """Over ids [0, n_ids): the used ids, the added tokens, the single bytes, closed under merges."""
    from encoders import _byte_level_alphabet

    vocab = spec["model"]["vocab"]
    kept = np.zeros(n_ids, bool)
    kept[np.asarray(list(used_ids), dtype=np.int64)] = True
    kept[[token["id"] for token in spec.get("added_tokens") or []]] = True
    kept[[vocab[char] for char in _byte_level_alphabet()]] = True
    unk = spec["model"].get("unk_token")
    if unk is not None and unk in vocab:
        kept[vocab[unk]] = True
    return closed_under_merges(spec, kept)


def pruned_spec(spec: dict, old_to_new: np.ndarray) -> dict:
    """The tokenizer JSON holding the kept tokens (old_to_new >= 0) at their new ids, and the merges
    whose parts and result are all kept, in the old order."""
    vocab = spec["model"]["vocab"]
    new = json.loads(json.dumps(spec))
    new["model"]["vocab"] = {token: int(old_to_new[i]) for token, i in vocab.items() if old_to_new[i] >= 0}
    kept_tokens = new["model"]["vocab"]
    new["model"]["merges"] = [merge for merge in spec["model"]["merges"]
                              if all(part in kept_tokens for part in (*merge_parts(merge), "".join(merge_parts(merge))))]
    for token in new.get("added_tokens") or []:
        token["id"] = int(old_to_new[token["id"]])
    if new.get("padding"):
        new["padding"]["pad_id"] = int(old_to_new[new["padding"]["pad_id"]])
    return new


def corpus_documents(keep_from: str) -> Iterator[list[str]]:
    """The corpus's documents, ENCODE_BATCH at a time, in the data tools' order."""
    from data.corpus import NotUTF8, find_files, read_documents

    files = find_files(keep_from, None)
    if not files:
        raise DataError(f"--keep_from {keep_from}: the folder holds no files")
    batch: list[str] = []
    for path in files:
        try:
            for document in read_documents(path):
                batch.append(document)
                if len(batch) == ENCODE_BATCH:
                    yield batch
                    batch = []
        except NotUTF8 as err:  # its advice names the data tools' --skip_non_utf8, which is not here
            raise DataError(f"{err.what}; --keep_from reads every file under {keep_from} as the corpus: convert "
                            "it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or move it out") from None
    if batch:
        yield batch


def is_tokenizer_file(keep_from: str) -> bool:
    return keep_from.endswith(".json")


def used_ids(tokenizer, keep_from: str) -> set[int]:
    """The ids of the model's tokenizer that --keep_from uses: a corpus's encoding, or the tokens (by
    string) of another tokenizer."""
    from encoders import load_tokenizer

    if is_tokenizer_file(keep_from):
        other = load_tokenizer(keep_from).tokenizer.get_vocab(with_added_tokens=True)
        ours = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        return {ours[token] for token in other if token in ours}
    used: set[int] = set()
    characters = 0
    for batch in corpus_documents(keep_from):
        characters += sum(len(document) for document in batch)
        for ids in tokenizer.encode_batch(batch):
            used.update(ids)
    if characters == 0:
        raise DataError(f"--keep_from {keep_from}: its files hold no text: no tokens to keep")
    return used


def check_same_encoding(old, new, keep_from: str, old_to_new: np.ndarray) -> int:
    """Encode the kept corpus with both tokenizers: the new ids must be the old ids renumbered.
    Returns the documents checked; a difference is a bug here, raised with the document."""
    documents = 0
    for batch in corpus_documents(keep_from):
        for document, old_ids, new_ids in zip(batch, old.encode_batch(batch), new.encode_batch(batch)):
            if old_to_new[np.asarray(old_ids, dtype=np.int64)].tolist() != new_ids:
                raise RuntimeError(f"the pruned tokenizer encodes a document of {keep_from} differently from the "
                                   f"original renumbered: {document[:80]!r}")
        documents += len(batch)
    return documents


def prune_tokenizer(tokenizer, keep_from: str, n_vocab: int, named_ids=()):
    """(pruned Tokenizer, kept old ids in order): the new tokenizer's id i is old id kept[i]; ids
    past the tokenizer (< n_vocab) that `named_ids` holds follow, as rows no token encodes to."""
    from tokenizers import Tokenizer as RustTokenizer

    from encoders import Tokenizer

    if storage.is_remote(keep_from) and not is_tokenizer_file(keep_from):
        raise ConfigError(f"--keep_from {keep_from}: a corpus is read from a local file or folder (a tokenizer "
                          ".json file may be remote)")
    if not storage.exists(keep_from):
        raise ConfigError(f"--keep_from {keep_from}: no such file or folder (a corpus file or folder, or a "
                          "tokenizer .json file)")
    spec = byte_level_spec(tokenizer)
    if tokenizer.vocab_size > n_vocab:
        raise ExportError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"n_vocab {n_vocab}")
    kept = np.zeros(n_vocab, bool)
    kept[: tokenizer.vocab_size] = kept_token_mask(spec, used_ids(tokenizer, keep_from), tokenizer.vocab_size)
    kept[[i for i in named_ids if i is not None and 0 <= i < n_vocab]] = True
    kept_ids = np.flatnonzero(kept)
    old_to_new = np.full(n_vocab, -1, np.int64)
    old_to_new[kept_ids] = np.arange(len(kept_ids))
    source = f"{tokenizer.source} pruned to {int(kept[: tokenizer.vocab_size].sum())} tokens by {keep_from}"
    pruned = Tokenizer(RustTokenizer.from_str(json.dumps(pruned_spec(spec, old_to_new))), source)
    if not is_tokenizer_file(keep_from):
        checked = check_same_encoding(tokenizer, pruned, keep_from, old_to_new)
        log.info("the %d documents of %s encode with the pruned tokenizer to the original ids renumbered",
                 checked, keep_from)
    return pruned, kept_ids


# --- the model ---------------------------------------------------------------------------------------


def pruned_params(params: dict, config, kept_ids: np.ndarray) -> dict:
    """Every weight with a `vocab` dimension, at the kept rows along it; the rest as it is."""
    import jax
    import jax.numpy as jnp

    from models import gpt2

    def keep(weight, value):
        if "vocab" not in weight.dims:
            return value
        return jnp.asarray(np.take(np.asarray(value), kept_ids, axis=weight.dims.index("vocab")))

    return jax.tree.map(keep, gpt2.weights(config), params, is_leaf=gpt2.is_weight)


def renumbered(value, old_to_new: dict[int, int]):
    """A config id (or list of ids) in the new numbering; an id no row holds stays out of range."""
    if isinstance(value, list):
        return [renumbered(v, old_to_new) for v in value]
    return old_to_new.get(value, len(old_to_new)) if value is not None else None


def prune_vocab(config, keep_from: str, model_path: str, config_out, step: int | None = None):
    """Prune config's model and tokenizer to what keep_from uses; write the pruned model to
    model_path and its config to config_out (module docstring). Returns the new config."""
    from checkpoints import CheckpointMeta, Checkpoints, checkpoints_directory
    from encoders import load_dataset_tokenizer
    from export import check_new_model_destination, restore_single_device, write_dataset_config
    from models import lora

    if lora.active(config):
        raise ExportError(f"{config.source}: --prune_vocab prunes a whole model; this config fine-tunes adapters "
                          "(lora_rank, prompt_tuning_tokens or prefix_tuning): prune the base (or a merged export "
                          "imported with --from_hf) instead")
    model_path, config_out = str(model_path), Path(config_out)
    dataset_config = check_new_model_destination(model_path, config_out)
    tokenizer = load_dataset_tokenizer(config)
    eos_id, padding_id = special_ids(config, tokenizer)
    named = {key: getattr(config, key) for key in TOKEN_ID_KEYS}
    named_ids = [i for value in [eos_id, padding_id, *named.values()]
                 for i in (value if isinstance(value, list) else [value])]
    pruned, kept_ids = prune_tokenizer(tokenizer, keep_from, config.n_vocab, named_ids)
    old_to_new = {int(old): new for new, old in enumerate(kept_ids)}

    params, source_step = restore_single_device(config, step)
    params = pruned_params(params, config, kept_ids)

    values = {key: value for key, value in config.to_dict().items() if value != KEYS[key].default}
    values |= {key: renumbered(value, old_to_new) for key, value in named.items() if value is not None}
    first = config.datasets[0]
    values |= {
        "n_vocab": len(kept_ids),
        "model_path": model_path,
        "eos_id": renumbered(eos_id, old_to_new),
        "padding_id": renumbered(padding_id, old_to_new),
        "datasets": [[dataset_config.stem, first[1], first[2], 1.0]],
    }
    new_config = validate(values, str(config_out))

    source = storage.absolute(storage.join(checkpoints_directory(config.model_path), str(source_step)))
    storage.makedirs(model_path)
    tokenizer_path = storage.join(model_path, TOKENIZER_FILE)
    storage.write_text(tokenizer_path, pruned.tokenizer.to_str())
    storage.write_text(storage.join(model_path, MAP_FILE), json.dumps({
        "pruned_from": source,
        "tokenizer": tokenizer.source,
        "keep_from": keep_from,
        "old_n_vocab": config.n_vocab,
        "n_vocab": len(kept_ids),
        "old_to_new": {str(old): new for old, new in old_to_new.items()},
    }) + "\n")
    write_dataset_config(dataset_config, values, tokenizer_path)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    config_out.write_text(json.dumps(values, indent=2) + "\n")
    checkpoints = Checkpoints(model_path, asynchronous=False)
    meta = CheckpointMeta.for_config(new_config, 0, params_only=True, imported_from=source)
    checkpoints.save(0, {"params": params, "opt_state": None}, meta)
    checkpoints.close()
    log.info("pruned step %d of %s from %d to %d tokens into %s; config %s", source_step, config.model_path,
             config.n_vocab, len(kept_ids), model_path, config_out)
    return new_config
