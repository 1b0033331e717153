"""Demo data for `make demo`: the Python standard library's sources -> tokenizer -> shards.

    python data/prepare_demo.py            # from the repository root; idempotent

Writes, under demo_data/ (relative to the working directory):
  corpus/      a few MB of the standard library's .py files (tests and site-packages left out)
  tokenizer/   byte-level-bpe.tokenizer.json, vocabulary 4096
  tfrecords/   demo_*.tfrecords, one record per file (documents mode)
  tfrecords_eval/  demo_eval_*.tfrecords, the evaluation split

configs/dataset_configs/demo.json points at these paths. A step whose output exists is skipped;
--force redoes everything.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import create_tfrecords, train_tokenizer  # noqa: E402

SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                   "turtledemo", "ensurepip"}
CORPUS_BYTES = 4_000_000  # a few MB: the tokenizer trains in seconds on 2 cores
EVAL_EVERY = 20  # one file in twenty goes to the evaluation split
VOCAB_SIZE = 4096


def stdlib_sources(limit_bytes: int) -> list[Path]:
    """The standard library's .py files in a fixed order, skipping tests, up to limit_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        size = path.stat().st_size
        if size == 0 or total + size > limit_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


def copy_corpus(corpus_dir: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    train_dir, eval_dir = corpus_dir / "train", corpus_dir / "eval"
    temporary = corpus_dir.with_name(corpus_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    for i, source in enumerate(stdlib_sources(CORPUS_BYTES)):
        target_dir = temporary / ("eval" if i % EVAL_EVERY == EVAL_EVERY - 1 else "train")
        target = target_dir / "__".join(source.relative_to(root).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    temporary.rename(corpus_dir)
    print(f"demo corpus: {sum(1 for _ in train_dir.iterdir())} training and {sum(1 for _ in eval_dir.iterdir())} "
          f"evaluation files in {corpus_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_data", help="default: demo_data")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if args.force:
        shutil.rmtree(out, ignore_errors=True)  # only our own demo folder, and only when asked
    corpus = out / "corpus"
    if not corpus.is_dir():
        copy_corpus(corpus)
    tokenizer = out / "tokenizer" / train_tokenizer.TOKENIZER_FILE
    if not tokenizer.is_file():
        train_tokenizer.main(["--base_dir", str(corpus / "train"), "--output_dir", str(tokenizer.parent),
                              "--file_type", "py", "--vocab_size", str(VOCAB_SIZE)])
    common = ["--encoder_path", str(tokenizer), "--file_type", "py",
              "--mode", "documents", "--minimum_size", "16", "--files_per", "400",
              "--processes", str(args.processes), "--quiet"]
    create_tfrecords.main(["--input_dir", str(corpus / "train"), "--name", "demo",
                           "--output_dir", str(out / "tfrecords"), *common])
    create_tfrecords.main(["--input_dir", str(corpus / "eval"), "--name", "demo_eval",
                           "--output_dir", str(out / "tfrecords_eval"), *common])


if __name__ == "__main__":
    from errors import run_command

    sys.exit(run_command(main))  # a mistake or bad data: one `error:` line, exit code 2
