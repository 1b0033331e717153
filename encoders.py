"""Tokenizers: a trained tokenizer.json, or a pretrained one (e.g. gpt2) from the local cache.

Everything downstream sees one small interface, `Tokenizer`: encode, encode_batch, decode,
eos_id and vocab_size. Pretrained tokenizers are never downloaded here: a training run must not
depend on the network, so a missing one is an error that says how to provide the files.

Encoding takes a fast path (tiktoken) when the tokenizer is a byte-level BPE that tiktoken
reproduces exactly, which `_FastByteLevelBPE.build` checks from the tokenizer's own JSON; any
other tokenizer (or tiktoken not installed) is encoded by `tokenizers`. Both give the same ids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

from errors import ConfigError

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
        self.fast = _FastByteLevelBPE.build(tokenizer)  # None: encode with `tokenizers`

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Batch encoding on num_threads threads (default: all cores; 1 in processes that share the cores)."""
        if self.fast is not None:
            return self.fast.encode_batch(texts, num_threads or os.cpu_count() or 1)
        # tokenizers' batch encoding runs on all cores (Rust threads), unlike a loop over encode
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        # special tokens stay visible: an <|endoftext|> between documents is worth seeing
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"fast={self.fast is not None})")


# GPT-2's pre-tokenization regex, the one tokenizers' ByteLevel pre-tokenizer splits with (use_regex)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_SURROGATE = re.compile("[\ud800-\udfff]")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class _FastByteLevelBPE:
    """tiktoken encoding of a byte-level BPE, ids equal to `tokenizers`' (add_special_tokens=False).

    Exactness rests on these checks of the tokenizer's JSON (build returns None if any fails):
      - pipeline: no truncation or padding; normalizer none or NFKC (applied here with tokenizers' own
        NFKC: Python's unicodedata is of another Unicode version and differs on some characters);
        pre-tokenizer ByteLevel with the GPT-2 regex; post-processor none or ByteLevel (offsets only);
      - added tokens: matched on the raw text (normalized false, no lstrip/rstrip/single_word), so the
        text is split on them leftmost-longest first, as tokenizers does, and each piece between them is
        normalized, given its prefix space (add_prefix_space) and encoded on its own;
      - model: plain BPE (no dropout, unk token, affixes, byte fallback or ignore_merges), all 256 bytes
        in the vocabulary, each merge making a distinct token, merge priority in the same order as the
        made token's id (tiktoken merges by the made token's rank, which is set to its id);
      - every token is what `tokenizers`' BPE makes of the token's own bytes. tiktoken also joins two
        adjacent tokens whose concatenation is a token but not their merge; the span of such a pair
        evolves exactly as the BPE of the concatenation alone would, which would end at that pair,
        so this check rules the case out.
    The regex's letter, number and space classes (Oniguruma in tokenizers, Rust's regex in tiktoken)
    agree on every code point (tests/test_fast_encoder.py). Text with lone surrogates, which
    tokenizers refuses and tiktoken would replace, is left to tokenizers.
    """

    def __init__(self, encoding, fallback, nfkc: bool, add_prefix_space: bool, added: dict[str, int]):
        self.encoding = encoding
        self.fallback = fallback
        # tokenizers' own NFKC: Python's unicodedata may be of another Unicode version
        self.normalizer = fallback.normalizer if nfkc else None
        self.add_prefix_space = add_prefix_space
        self.added = added
        self.added_pattern = (re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
                              if added else None)

    @classmethod
    def build(cls, tokenizer: _RustTokenizer) -> _FastByteLevelBPE | None:
        try:
            import tiktoken
        except ImportError:
            return None
        try:
            return cls._build(tokenizer, tiktoken)
        except Exception:  # anything unexpected in the JSON: tokenizers encodes it
            return None

    @classmethod
    def _build(cls, tokenizer: _RustTokenizer, tiktoken) -> _FastByteLevelBPE | None:
        spec = json.loads(tokenizer.to_str())
        if spec.get("truncation") is not None or spec.get("padding") is not None:
            return None
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer != {"type": "NFKC"}:
            return None
        pre = spec.get("pre_tokenizer")
        if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
                and set(pre) <= {"type", "add_prefix_space", "trim_offsets", "use_regex"}):
            return None
        post = spec.get("post_processor")
        if post is not None and post.get("type") != "ByteLevel":
            return None
        model = spec.get("model") or {}
        if (model.get("type") != "BPE" or model.get("dropout") is not None or model.get("unk_token") is not None
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                or model.get("byte_fallback") or model.get("ignore_merges")):
            return None
        added = {}
        for token in spec.get("added_tokens") or []:
            if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
                return None
            if not token["content"]:
                return None
            added[token["content"]] = token["id"]
        added_ids = set(added.values())
        vocab: dict[str, int] = model["vocab"]
        alphabet = _byte_level_alphabet()
        if any(char not in vocab for char in alphabet):
            return None
        ranks: dict[bytes, int] = {}
        for token, token_id in vocab.items():
            if token_id in added_ids:
                continue
            if any(char not in alphabet for char in token):
                return None
            ranks[bytes(alphabet[char] for char in token)] = token_id
        if len(set(ranks.values())) != len(ranks):
            return None
        made_ids = []
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            made = vocab.get(left + right)
            if made is None or made in added_ids or left not in vocab or right not in vocab:
                return None
            made_ids.append(made)
        if any(a >= b for a, b in zip(made_ids, made_ids[1:])):  # increasing: priority order is id order
            return None
        if not _every_token_is_its_own_bpe(spec, [t for t, i in vocab.items() if i not in added_ids]):
            return None
        encoding = tiktoken.Encoding("neomesh-byte-level-bpe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={})
        return cls(encoding, tokenizer, normalizer is not None, bool(pre.get("add_prefix_space", True)), added)

    def _pieces(self, text: str) -> list[str | int]:
        """The text split on added tokens: strings to encode (normalized, prefixed) and added-token ids."""
        parts: list[str | int] = []
        start = 0
        if self.added_pattern is not None and text:
            for match in self.added_pattern.finditer(text):
                if match.start() > start:
                    parts.append(text[start:match.start()])
                parts.append(self.added[match.group()])
                start = match.end()
        if start < len(text):
            parts.append(text[start:] if start else text)
        for i, part in enumerate(parts):
            if isinstance(part, str):
                if self.normalizer is not None and not part.isascii():  # NFKC leaves ASCII as it is
                    part = self.normalizer.normalize_str(part)
                if self.add_prefix_space and not part.startswith(" "):
                    part = " " + part
                parts[i] = part
        return parts

    def _sure(self, text: str) -> bool:
        return text.isascii() or not _SURROGATE.search(text)

    def encode(self, text: str) -> list[int]:
        if not self._sure(text):
            return self.fallback.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for part in self._pieces(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self.encoding.encode_ordinary(part))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(text) for text in texts]
        sure = [self._sure(text) for text in texts]
        pieces = [self._pieces(text) if ok else [] for text, ok in zip(texts, sure)]
        strings = [part for parts in pieces for part in parts if isinstance(part, str)]
        encoded = iter(self.encoding.encode_ordinary_batch(strings, num_threads=min(num_threads, len(strings) or 1)))
        results = []
        for text, ok, parts in zip(texts, sure, pieces):
            if not ok:
                results.append(self.fallback.encode(text, add_special_tokens=False).ids)
                continue
            ids: list[int] = []
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(next(encoded))
            results.append(ids)
        return results


def _every_token_is_its_own_bpe(spec: dict, tokens: list[str]) -> bool:
    """Whether `tokenizers`' BPE model, alone, turns each token's byte-level string into that one token."""
    bare = dict(spec, normalizer=None, pre_tokenizer=None, post_processor=None, decoder=None, added_tokens=[])
    model = _RustTokenizer.from_str(json.dumps(bare))
    encodings = model.encode_batch([[token] for token in tokens], is_pretokenized=True, add_special_tokens=False)
    return all(encoding.tokens == [token] for token, encoding in zip(tokens, encodings))


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer(_RustTokenizer.from_file(str(path)), str(path))
    except Exception as err:  # the Rust side raises a plain Exception with a serde message
        raise ConfigError(f"{path}: not a tokenizers tokenizer.json file ({err})") from None


def _from_storage(url: str) -> Tokenizer:
    """A tokenizer.json at a URL (or the first *tokenizer.json in a folder there)."""
    import storage

    if storage.isdir(url):
        candidates = storage.glob(storage.join(url, "*tokenizer.json"))
        if not candidates:
            raise ConfigError(f"{url}: folder holds no *tokenizer.json file")
        url = candidates[0]
    if not storage.isfile(url):
        raise ConfigError(f"tokenizer {url!r}: no such file")
    try:
        return Tokenizer(_RustTokenizer.from_str(storage.read_text(url)), url)
    except Exception as err:  # the Rust side raises a plain Exception with a serde message
        raise ConfigError(f"{url}: not a tokenizers tokenizer.json file ({err})") from None


def _cached_pretrained_file(name: str) -> Path | None:
    """tokenizer.json of a pretrained tokenizer in the local Hugging Face cache, if present."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "tokenizer.json")
    except ValueError:  # not a valid Hugging Face name (a path, say): nothing of that name is cached
        return None
    return Path(found) if isinstance(found, str) else None


def _from_transformers_cache(name: str) -> Tokenizer | None:
    """Pretrained tokenizers stored without a tokenizer.json (vocab.json + merges.txt) via transformers."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in ("vocab.json", "tokenizer_config.json")):
            return None  # nothing cached: spare the slow transformers import
        from transformers import AutoTokenizer
    except (ImportError, ValueError):  # ValueError: not a valid Hugging Face name, so nothing is cached
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
    if "://" in path_or_name:  # gs://..., memory://...: read through storage
        return _from_storage(path_or_name)
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
