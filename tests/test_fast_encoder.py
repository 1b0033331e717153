"""The tiktoken fast path of encoders.Tokenizer gives exactly the ids `tokenizers` gives.

A byte-level BPE is trained here (data/train_tokenizer.py) on a few hundred KB of the standard
library's sources; its ids from the fast path are compared with the same tokenizer.json encoded
by `tokenizers` directly, on source files, awkward text and every code point in context.
Tokenizers the fast path cannot reproduce must fall back to `tokenizers` and still encode.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer

from data import train_tokenizer
from data.prepare_demo import stdlib_sources
from encoders import Tokenizer, _byte_level_alphabet, load_tokenizer

pytest.importorskip("tiktoken")

STDLIB = Path(sysconfig.get_paths()["stdlib"])

AWKWARD = [
    "",
    " ",
    "x",
    "   leading spaces",
    "\tleading tab",
    "trailing spaces   ",
    "a  b   c    d\t\te\t \t f",
    "line one\r\nline two\r\n\r\n  indented\r\n",
    "\n\n\n    \n\t\n",
    " " * 40 + "x" + "\t" * 9 + "\n" * 7,
    "café naïve résumé Ångström Œuvre Straße",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉🚀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining e\u0301 a\u0308 o\u0303\u0323 and precomposed é ä",  # NFKC composes these
    "fullwidth ＡＢＣ１２３ ｈｅｌｌｏ　world",  # NFKC: ASCII, ideographic space -> space
    "ligatures ﬁ ﬂ ﬀ, ² ³ ½ ™ ℌ ⅷ ㎏ ① ﹏ ｶﾀｶﾅ",
    "\u3000starts with an ideographic space",
    "Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "it's we're they've I'm you'll he'd 'S 'T",
    "numbers 123 4.56 7,890 ١٢٣ ૧૨",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "a<|endoftext|><|endoftext|> b <|padding|>c",
    " <|endoftext|> spaced <|endoftext|>",
    "<|endoftext|",  # not the token
    "＜|endoftext|＞ fullwidth lookalike, NFKC turns it into plain text",
    "<|endoftext|>\u0301 a mark after the special token",
    "x" * 5000,
    "ab" * 3000 + " " * 3000,
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    corpus = stdlib_sources(400_000)
    tokenizer = train_tokenizer.train_tokenizer(corpus, "py", vocab_size=2048)
    path = tmp_path_factory.mktemp("tok") / train_tokenizer.TOKENIZER_FILE
    tokenizer.save(str(path))
    return path


def reference_ids(path_or_rust, texts: list[str]) -> list[list[int]]:
    rust = path_or_rust if isinstance(path_or_rust, RustTokenizer) else RustTokenizer.from_file(str(path_or_rust))
    return [encoding.ids for encoding in rust.encode_batch(texts, add_special_tokens=False)]


def assert_same(tokenizer: Tokenizer, reference: list[list[int]], texts: list[str]) -> None:
    for threads in (1, 2):
        got = tokenizer.encode_batch(texts, num_threads=threads)
        mismatched = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
        assert len(got) == len(reference) and not mismatched, [texts[i][:80] for i in mismatched[:5]]
    assert [tokenizer.encode(text) for text in texts] == reference


def test_trained_tokenizer_takes_the_fast_path(trained):
    spec = json.loads(trained.read_text())
    assert spec["normalizer"] == {"type": "NFKC"} and spec["pre_tokenizer"]["add_prefix_space"] is True
    assert load_tokenizer(str(trained)).fast is not None


def test_stdlib_files_equal(trained):
    tokenizer = load_tokenizer(str(trained))
    texts = [path.read_text(errors="replace") for path in stdlib_sources(3_000_000)]
    assert len(texts) > 150
    assert_same(tokenizer, reference_ids(trained, texts), texts)


def test_awkward_text_equal(trained):
    tokenizer = load_tokenizer(str(trained))
    reference = reference_ids(trained, AWKWARD)
    assert reference[AWKWARD.index("<|endoftext|>")] == [tokenizer.eos_id]  # the special token, not text
    assert_same(tokenizer, reference, AWKWARD)
    joined = ["".join(AWKWARD), "\n".join(AWKWARD), "<|endoftext|>".join(AWKWARD)]
    assert_same(tokenizer, reference_ids(trained, joined), joined)


def every_code_point_in_context() -> list[str]:
    """Each code point in a few contexts (letters, digits, spaces, itself): planes 0-3 and 14 whole,
    every 97th of the rest (mostly unassigned or private use), surrogates left out."""
    points = [c for c in range(0x110000) if (c < 0x40000 or 0xE0000 <= c < 0xE1000 or c % 97 == 0)
              and not 0xD800 <= c <= 0xDFFF]
    texts = []
    for start in range(0, len(points), 256):
        texts.append("".join(f"a{ch}b {ch}{ch}1{ch}\t{ch} \n" for ch in map(chr, points[start:start + 256])))
    return texts


def test_every_code_point_equal(trained):
    # NFKC, the letter/number/space classes of the split regex and the byte mapping, against tokenizers'
    tokenizer = load_tokenizer(str(trained))
    texts = every_code_point_in_context()
    got, reference = tokenizer.encode_batch(texts), reference_ids(trained, texts)
    assert len(got) == len(reference) and all(a == b for a, b in zip(got, reference))


def test_without_normalizer_or_prefix_space_equal(trained):
    # GPT-2's own layout: no normalizer, no prefix space
    spec = json.loads(trained.read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"]["add_prefix_space"] = False
    rust = RustTokenizer.from_str(json.dumps(spec))
    tokenizer = Tokenizer(rust, "gpt2-like")
    assert tokenizer.fast is not None
    texts = AWKWARD + [path.read_text(errors="replace") for path in stdlib_sources(300_000)]
    assert_same(tokenizer, reference_ids(rust, texts), texts)


def test_lone_surrogates_are_left_to_tokenizers(trained):
    tokenizer = load_tokenizer(str(trained))
    with pytest.raises(TypeError):
        tokenizer.tokenizer.encode("a\ud800b", add_special_tokens=False)
    with pytest.raises(TypeError):
        tokenizer.encode("a\ud800b")


def changed(path: Path, change) -> RustTokenizer:
    spec = json.loads(path.read_text())
    change(spec)
    return RustTokenizer.from_str(json.dumps(spec))


def _swap_two_merges(spec):
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]


FALLBACKS = {
    "lowercase normalizer": lambda spec: spec.update(normalizer={"type": "Lowercase"}),
    "NFC normalizer": lambda spec: spec.update(normalizer={"type": "NFC"}),
    "whitespace pre-tokenizer": lambda spec: spec.update(pre_tokenizer={"type": "Whitespace"}),
    "byte-level without the regex": lambda spec: spec["pre_tokenizer"].update(use_regex=False),
    "merge order differs from id order": _swap_two_merges,
    "special token normalized": lambda spec: spec["added_tokens"][0].update(normalized=True),
    "truncation": lambda spec: spec.update(truncation={"direction": "Right", "max_length": 8, "strategy":
                                                       "LongestFirst", "stride": 0}),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unreproducible_tokenizers_fall_back(trained, name):
    rust = changed(trained, FALLBACKS[name])
    tokenizer = Tokenizer(rust, name)
    assert tokenizer.fast is None
    texts = AWKWARD + [(STDLIB / "bisect.py").read_text()]
    assert_same(tokenizer, reference_ids(rust, texts), texts)


def test_a_token_bpe_cannot_make_from_its_own_bytes_falls_back():
    # merges b+c, then a+b, then ab+c, ids in merge order: BPE turns "abc" into a, bc (a+bc is no merge)
    # while joining by the made token's rank, as tiktoken does, would give abc
    alphabet = list(_byte_level_alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"bc": 256, "ab": 257, "abc": 258})
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [["b", "c"], ["a", "b"], ["ab", "c"]]},
    }
    rust = RustTokenizer.from_str(json.dumps(spec))
    assert rust.encode("abc").ids == [vocab["a"], 256]
    tokenizer = Tokenizer(rust, "unreachable abc")
    assert tokenizer.fast is None
    assert tokenizer.encode("abc") == [vocab["a"], 256] and tokenizer.encode_batch(["abc", "ab c"]) == [
        [vocab["a"], 256], [257, vocab["Ġ"], vocab["c"]]]

    import tiktoken  # what the check prevents: tiktoken's own merging of the same vocabulary

    ranks = {bytes([_byte_level_alphabet()[c] for c in token]): i for token, i in vocab.items()}
    naive = tiktoken.Encoding("naive", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    assert naive.encode_ordinary("abc") == [258]
