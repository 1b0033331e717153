"""Train a byte-level BPE tokenizer on a corpus (GPT-Neo's command line).

    python data/train_tokenizer.py --base_dir corpus/ --output_dir tok/ --file_type txt --vocab_size 50257

Writes `byte-level-bpe.tokenizer.json` and `dataset_config.json` (a dataset config to copy into
configs/dataset_configs/) into --output_dir, a local folder or gs://bucket/... . Special tokens: `<|endoftext|>` is id 0 and
`<|padding|>` id 1. Every matching file is used, and an existing tokenizer is only overwritten
after asking (or with --overwrite); nothing else in the folder is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers import ByteLevelBPETokenizer  # noqa: E402

import storage  # noqa: E402
from data.corpus import NotUTF8, find_files, first_undecodable, read_documents, skipped_warning  # noqa: E402
from errors import ConfigError, DataError, run_command  # noqa: E402

TOKENIZER_FILE = "byte-level-bpe.tokenizer.json"
DATASET_CONFIG_FILE = "dataset_config.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, in this order
PLAIN_TEXT_TYPES = ("txt",)
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte; merges add to it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_dir", required=True, help="folder searched recursively for input files (or one file)")
    parser.add_argument("--output_dir", default="tokenizers", help="where the tokenizer is written (default: tokenizers)")
    parser.add_argument("--file_type", default="txt",
                        help="extension of the input files: txt, jsonl, jsonl.zst, xz, tar.gz, ...; any other "
                             "(e.g. py) is read as plain text, one document per file (default: txt)")
    parser.add_argument("--vocab_size", type=int, default=50257, help="vocabulary size, special tokens included")
    parser.add_argument("--min_frequency", type=int, default=2, help="merges seen fewer times are not learned")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer without asking")
    parser.add_argument("--skip_non_utf8", action="store_true",
                        help="leave out a file that is not UTF-8 text, with a warning naming it (default: stop with an "
                             "error naming it; create_tfrecords.py takes the same flag)")
    return parser.parse_args(argv)


def confirm_overwrite(path: str, overwrite: bool) -> None:
    if not storage.exists(path) or overwrite:
        return
    if sys.stdin.isatty():
        answer = input(f"{path} exists. Overwrite it? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            return
    raise ConfigError(f"{path} exists; not overwriting it. Pass --overwrite to replace it, or pick another --output_dir.")


def documents(files: list[Path], characters: list[int], skip_non_utf8: bool = False) -> Iterator[str]:
    """Every document of the files, counting their characters into characters[0] as they stream."""
    for path in files:
        used = 0
        try:
            for document in read_documents(path):
                characters[0] += len(document)
                used += 1
                yield document
        except NotUTF8 as err:
            if not skip_non_utf8:
                raise
            print(skipped_warning(err, used), file=sys.stderr)


def utf8_files(files: list[Path]) -> list[Path]:
    """The plain-text files that are UTF-8; each other one is named in a warning and left out."""
    kept = []
    for path in files:
        undecodable = first_undecodable(path)
        if undecodable is None:
            kept.append(path)
        else:
            print(skipped_warning(NotUTF8(path, *undecodable), 0), file=sys.stderr)
    return kept


def is_plain_text(file_type: str) -> bool:
    # the Rust trainer reads plain-text files itself, in parallel; everything else is streamed
    from data.corpus import LM_DATAFORMAT_SUFFIXES

    suffix = "." + file_type.lstrip(".")
    return file_type in PLAIN_TEXT_TYPES or not (suffix.endswith(LM_DATAFORMAT_SUFFIXES) or suffix.endswith(".xz"))


def train_tokenizer(files: list[Path], file_type: str, vocab_size: int, min_frequency: int = 2,
                    skip_non_utf8: bool = False) -> ByteLevelBPETokenizer:
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=True, unicode_normalizer="nfkc")
    options = dict(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                   show_progress=sys.stderr.isatty())
    if is_plain_text(file_type):
        if skip_non_utf8:
            files = utf8_files(files)
            if not files:
                raise DataError("no input file is UTF-8 text (each was skipped, see the warnings above): "
                                "no text to learn a vocabulary from")
        try:
            tokenizer.train([str(p) for p in files], **options)
        except Exception as err:  # the Rust trainer's only error type ("stream did not contain valid UTF-8")
            if "UTF-8" not in str(err):
                raise
            for path in files:  # name the file it could not read
                undecodable = first_undecodable(path)
                if undecodable is not None:
                    raise NotUTF8(path, *undecodable) from None
            raise
    else:
        characters = [0]
        tokenizer.train_from_iterator(documents(files, characters, skip_non_utf8), **options)
        if characters[0] == 0:
            raise DataError(f"the {len(files)} input file(s) hold no text ({files[0]}, ...): "
                            "no text to learn a vocabulary from")
    return tokenizer


def main(argv: list[str] | None = None) -> Path | str:
    args = parse_args(argv)
    if args.vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"--vocab_size {args.vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens")
    try:
        files = find_files(args.base_dir, args.file_type)
    except FileNotFoundError as err:
        raise ConfigError(f"--base_dir: {err}") from None
    if not files:
        raise ConfigError(f"--base_dir {args.base_dir}: no files ending in .{args.file_type.lstrip('.')} "
                         "(searched recursively); set --file_type to the corpus's extension")
    total_bytes = sum(p.stat().st_size for p in files)
    if total_bytes == 0:
        raise DataError(f"--base_dir {args.base_dir}: its {len(files)} file(s) ending in .{args.file_type.lstrip('.')} "
                        f"are empty ({files[0]}, ...): no text to learn a vocabulary from")
    output_dir = args.output_dir  # a local folder or gs://...
    tokenizer_path = storage.join(output_dir, TOKENIZER_FILE)
    confirm_overwrite(tokenizer_path, args.overwrite)
    storage.makedirs(output_dir)

    print(f"training a {args.vocab_size}-token byte-level BPE on {len(files)} files ({total_bytes / 1e6:.1f} MB)")
    tokenizer = train_tokenizer(files, args.file_type, args.vocab_size, args.min_frequency, args.skip_non_utf8)
    storage.write_text(tokenizer_path, tokenizer.to_str(pretty=True))

    eos_id = tokenizer.token_to_id(SPECIAL_TOKENS[0])
    padding_id = tokenizer.token_to_id(SPECIAL_TOKENS[1])
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size <= BYTE_ALPHABET + len(SPECIAL_TOKENS) < args.vocab_size:
        print(f"warning: learned no merges (vocabulary {vocab_size}: the {BYTE_ALPHABET} bytes and the special "
              f"tokens) from {total_bytes} bytes; give more text, or a lower --min_frequency", file=sys.stderr)
    dataset_config = {
        "n_vocab": vocab_size,
        "path": "REPLACE/WITH/YOUR/tfrecords/*.tfrecords",
        "eval_path": "",
        "tokenizer_is_pretrained": False,
        "tokenizer_path": str(tokenizer_path),
        "eos_id": eos_id,
        "padding_id": padding_id,
    }
    storage.write_text(storage.join(output_dir, DATASET_CONFIG_FILE), json.dumps(dataset_config, indent=2) + "\n")
    print(f"saved {tokenizer_path} (vocabulary {vocab_size})")
    print(f"{SPECIAL_TOKENS[0]} id {eos_id}; {SPECIAL_TOKENS[1]} id {padding_id}")
    print(f"suggested dataset config: {storage.join(output_dir, DATASET_CONFIG_FILE)}")
    return tokenizer_path if storage.is_remote(tokenizer_path) else Path(tokenizer_path)


if __name__ == "__main__":
    sys.exit(run_command(main))  # a mistake or bad data: one `error:` line, exit code 2
