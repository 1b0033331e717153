"""Tokenizers: a trained tokenizer.json, or a pretrained one (e.g. gpt2) from the local cache.

Everything downstream sees one small interface, `Tokenizer`: encode, encode_batch, decode,
eos_id and vocab_size. Pretrained tokenizers are never downloaded here: a training run must not
depend on the network, so a missing one is an error that says how to provide the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

from configs import ConfigError

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few operations neomesh needs."""

    def __init__(self, tokenizer: _RustTokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source
        self.eos_id = next(
            (tokenizer.token_to_id(token) for token in EOS_TOKENS if tokenizer.token_to_id(token) is not None),
            None,
        )
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tokenizers' batch encoding runs on all cores (Rust threads), unlike a loop over encode
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # special tokens stay visible: an <|endoftext|> between documents is worth seeing
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer(_RustTokenizer.from_file(str(path)), str(path))
    except Exception as err:  # the Rust side raises a plain Exception with a serde message
        raise ConfigError(f"{path}: not a tokenizers tokenizer.json file ({err})") from None


def _cached_pretrained_file(name: str) -> Path | None:
    """tokenizer.json of a pretrained tokenizer in the local Hugging Face cache, if present."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "tokenizer.json")
    return Path(found) if isinstance(found, str) else None


def _from_transformers_cache(name: str) -> Tokenizer | None:
    """Pretrained tokenizers stored without a tokenizer.json (vocab.json + merges.txt) via transformers."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in ("vocab.json", "tokenizer_config.json")):
            return None  # nothing cached: spare the slow transformers import
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        fast = AutoTokenizer.from_pretrained(name, local_files_only=True, use_fast=True)
    except Exception:
        return None
    backend = getattr(fast, "backend_tokenizer", None) or getattr(fast, "_tokenizer", None)
    return Tokenizer(backend, name) if backend is not None else None


def load_tokenizer(path_or_name: str, is_pretrained: bool = False) -> Tokenizer:
    """A tokenizer.json path, a folder holding one, or (is_pretrained) a name like `gpt2`.

    Pretrained names are looked up only in the local Hugging Face cache (offline).
    """
    if not path_or_name:
        raise ConfigError("no tokenizer given: set tokenizer_path in the dataset config (a tokenizer.json path, "
                          "or a pretrained name such as gpt2 with tokenizer_is_pretrained: true)")
    path = Path(path_or_name)
    if path.is_dir():
        candidates = sorted(path.glob("*tokenizer.json"))
        if not candidates:
            raise ConfigError(f"{path}: folder holds no *tokenizer.json file")
        return _from_file(candidates[0])
    if path.is_file():
        return _from_file(path)
    if not is_pretrained and (path.suffix == ".json" or os.sep in path_or_name):
        raise ConfigError(f"tokenizer {path_or_name!r}: no such file (relative paths are relative to the "
                          f"working directory, {os.getcwd()})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network from here
    cached = _cached_pretrained_file(path_or_name)
    if cached is not None:
        return _from_file(cached)
    tokenizer = _from_transformers_cache(path_or_name)
    if tokenizer is not None:
        return tokenizer
    raise ConfigError(
        f"pretrained tokenizer {path_or_name!r} is not in the local Hugging Face cache and neomesh does not "
        f"download. Either run, once, with network access: python -c \"from transformers import AutoTokenizer; "
        f"AutoTokenizer.from_pretrained('{path_or_name}')\", or save its tokenizer.json somewhere and set "
        "tokenizer_path to that file (tokenizer_is_pretrained: false)."
    )


def load_dataset_tokenizer(config) -> Tokenizer:
    """The tokenizer of the first dataset named by the config (its tokenizer_path / tokenizer_is_pretrained)."""
    from configs import resolve_datasets

    dataset = resolve_datasets(config)[0]
    try:
        return load_tokenizer(dataset.tokenizer_path, dataset.tokenizer_is_pretrained)
    except ConfigError as err:
        raise ConfigError(f"{dataset.file}: key 'tokenizer_path' = {dataset.tokenizer_path!r}: {err}") from None
