"""Tokenize a corpus into TFRecord shards (GPT-Neo's command line and shard format).

    python data/create_tfrecords.py --input_dir corpus/ --name mydata --output_dir tfrecords/ \\
        --encoder_path tok/byte-level-bpe.tokenizer.json --minimum_size 100

Each record is a tf.train.Example with one int64 feature `text`. Three layouts (--mode):

  chunks         GPT-Neo's: documents joined by the separator, cut into records of chunk_size + 1
                 tokens; a document's tail carries over into the next chunk (across files too),
                 and only the very last record of the corpus may be shorter.
  documents      one record per document (its tokens, then the separator): what the sampler's
                 documents_random / documents_fixed modes stitch together.
  conversations  one record per conversation of Firefly-format jsonl files (data/conversations.py),
                 rendered with --conversation_template, each assistant turn ending with the
                 separator; the record carries a second int64 feature `target_mask` (1 on the
                 assistant's tokens): what the sampler's conversations mode trains on.

Shards are named `{name}_{i}_{count}.tfrecords`, count being their number of records. The
output depends only on the inputs and the flags, not on --processes. Each shard is written
atomically and progress is recorded after each one, so an interrupted run, rerun with the same
flags, continues where it stopped and ends with exactly the shards of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import storage  # noqa: E402
from data.conversations import load_template, read_conversations, render  # noqa: E402
from data.corpus import (  # noqa: E402
    LM_DATAFORMAT_NAMES,
    LM_DATAFORMAT_SUFFIXES,
    NotUTF8,
    find_files,
    first_undecodable,
    read_documents,
    skipped_warning,
)
from errors import ConfigError, DataError, run_command  # noqa: E402
from tfrecord import MaskedRecord, write_shard  # noqa: E402

DEFAULT_SUFFIXES = (*LM_DATAFORMAT_SUFFIXES, ".txt", ".xz")
DOCUMENTS_PER_TASK = 64  # documents per unit of work sent to an encoding process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder searched recursively for the corpus (or one file)")
    parser.add_argument("--file_type", default=None,
                        help="read only files with this extension (any extension, e.g. py, is read as plain text); "
                             "default: every lm_dataformat format plus txt and xz")
    parser.add_argument("--name", default="data", help="shard name prefix (default: data)")
    parser.add_argument("--output_dir", default="./tfrecords", help="where the shards go (default: ./tfrecords)")
    parser.add_argument("--encoder_path", default=None,
                        help="a tokenizer.json (or a folder holding one), or a pretrained tokenizer name found in the "
                             "local Hugging Face cache (default: gpt2)")
    parser.add_argument("--use_gpt2_tokenizer", action="store_true",
                        help="encode with GPT-2's pretrained tokenizer (from the local Hugging Face cache), the same "
                             "as leaving --encoder_path out")
    parser.add_argument("--separator", nargs="+", default=None, metavar="ID",
                        help="the token id(s) appended after every document (in conversations mode, after every "
                             "assistant turn): --separator 0, --separator 0 1, or GPT-Neo's list form --separator "
                             "\"[0]\" (default: the tokenizer's <|endoftext|> id)")
    parser.add_argument("--minimum_size", type=int, default=None,
                        help="drop documents (conversations) shorter than this many tokens (default: 100; in "
                             "conversations mode 1)")
    parser.add_argument("--chunk_size", type=int, default=2048, help="chunks mode: records hold chunk_size + 1 tokens")
    parser.add_argument("--files_per", type=int, default=100000, help="records per shard")
    parser.add_argument("--mode", choices=("chunks", "documents", "conversations"), default="chunks",
                        help="chunks (GPT-Neo's, for the chunks sampling mode), documents (one record per document, "
                             "for documents_random / documents_fixed) or conversations (one record per conversation "
                             "of Firefly-format jsonl, with a target mask, for the conversations sampling mode); "
                             "default: chunks")
    parser.add_argument("--conversation_template", default=None, metavar="FILE",
                        help="conversations mode: a JSON object of template strings (system, human_prefix, "
                             "human_suffix, assistant_prefix, assistant_suffix; see data/conversations.py); "
                             "default: Human: ... / Assistant: ...")
    parser.add_argument("--processes", type=int, default=0, help="encoding processes (default, and 0: all cores)")
    parser.add_argument("--no_ftfy", "--ftfy", dest="ftfy", action="store_false",
                        help="do not repair text with ftfy (on by default). --ftfy is GPT-Neo's spelling, with GPT-Neo's "
                             "meaning: passing it turns ftfy off")
    parser.add_argument("--wikitext_detokenize", action="store_true",
                        help="undo WikiText's tokenization (' @-@ ', ' , ', ...); off by default: it mangles code")
    parser.add_argument("--wikitext-detokenize", dest="gpt_neo_wikitext_flag", action="store_true",
                        help="GPT-Neo's flag, with GPT-Neo's meaning: no WikiText detokenizer (already the default "
                             "here; --wikitext_detokenize turns it on)")
    parser.add_argument("--write_dataset_config", action="store_true",
                        help="when done, write a dataset config naming the shards and the tokenizer to "
                             "--dataset_config_dir/<name>.json")
    parser.add_argument("--dataset_config_dir", default=str(REPO_DIR / "configs" / "dataset_configs"),
                        help="where --write_dataset_config writes (default: configs/dataset_configs, where --model "
                             "configs look for dataset ids)")
    parser.add_argument("--skip_non_utf8", action="store_true",
                        help="leave out a file that is not UTF-8 text, with a warning naming it (default: stop with an "
                             "error naming it; train_tokenizer.py takes the same flag)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.minimum_size is None:
        args.minimum_size = 1 if args.mode == "conversations" else 100
    if args.conversation_template is not None and args.mode != "conversations":
        parser.error(f"--conversation_template is for --mode conversations, not --mode {args.mode}")
    for name in ("minimum_size", "chunk_size", "files_per", "processes"):
        if getattr(args, name) < (0 if name in ("minimum_size", "processes") else 1):
            parser.error(f"--{name} {getattr(args, name)}: must be a positive number")
    if args.use_gpt2_tokenizer and args.encoder_path not in (None, "gpt2"):
        parser.error(f"--use_gpt2_tokenizer and --encoder_path {args.encoder_path}: give one tokenizer")
    if args.wikitext_detokenize and args.gpt_neo_wikitext_flag:
        parser.error("--wikitext_detokenize turns the WikiText detokenizer on, GPT-Neo's --wikitext-detokenize turns "
                     "it off: give one")
    if args.gpt_neo_wikitext_flag:
        print("--wikitext-detokenize: no WikiText detokenizer, as in GPT-Neo (the default here; "
              "--wikitext_detokenize turns it on)", file=sys.stderr)
    args.encoder_path = args.encoder_path or "gpt2"  # GPT-Neo's default: GPT-2's tokenizer
    args.processes = args.processes or os.cpu_count() or 1
    return args


# --- text cleaning (runs in the encoding processes) ----------------------------------------------

# Printable ASCII except '&', plus tab and newline: text made only of these is exactly what ftfy
# returns unchanged (no mojibake, entities, control characters or odd line breaks are possible),
# so the slow repair is skipped for it — most source code and much English prose.
_NEEDS_FTFY = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def fix_text(text: str) -> str:
    if not _NEEDS_FTFY.search(text):
        return text
    import ftfy

    return ftfy.fix_text(text, normalization="NFKC")


_WIKITEXT_RULES = [
    (re.compile(r" @([-.,])@ "), r"\1"),
    (re.compile(r"(\S) ([.,:;!?])(?= |\n|$)"), r"\1\2"),
    (re.compile(r"([(\[{]) "), r"\1"),
    (re.compile(r" ([)\]}])"), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r"(=+) (?==)"), r"\1"),
    (re.compile(r" \n"), "\n"),
    (re.compile(r"\n "), "\n"),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization: ' @-@ ' -> '-', ' , ' -> ', ', '( x )' -> '(x)', '= = =' -> '==='."""
    for pattern, replacement in _WIKITEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


_worker_tokenizer = None
_worker_options: dict = {}


def _init_worker(encoder_path: str, is_pretrained: bool, use_ftfy: bool, wikitext: bool,
                 template: dict | None = None, end_ids: list[int] | None = None) -> None:
    global _worker_tokenizer, _worker_options
    from encoders import load_tokenizer

    _worker_tokenizer = load_tokenizer(encoder_path, is_pretrained)
    _worker_options = {"ftfy": use_ftfy, "wikitext": wikitext, "template": template, "end_ids": end_ids}


def _encode_conversations(conversations: list[list[tuple[str, str]]]) -> list[MaskedRecord]:
    def clean(text: str) -> str:
        if _worker_options["wikitext"]:
            text = wikitext_detokenize(text)
        return fix_text(text) if _worker_options["ftfy"] else text

    return [MaskedRecord(*render([(clean(human), clean(assistant)) for human, assistant in turns],
                                 _worker_options["template"], _worker_tokenizer.encode, _worker_options["end_ids"]))
            for turns in conversations]


def _encode_documents(texts: list[str]) -> list[np.ndarray]:
    if _worker_options["wikitext"]:
        texts = [wikitext_detokenize(text) for text in texts]
    if _worker_options["ftfy"]:
        texts = [fix_text(text) for text in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in _worker_tokenizer.encode_batch(texts, num_threads=1)]


# --- the ordered document stream ---------------------------------------------------------------


def input_files(input_dir: str, file_type: str | None, mode: str = "chunks") -> list[Path]:
    if mode == "conversations":  # conversations are jsonl lines, read here line by line
        return find_files(input_dir, file_type or "jsonl")
    files = find_files(input_dir, file_type)
    if file_type is None:
        files = [p for p in files if p.name.endswith(DEFAULT_SUFFIXES) or p.name in LM_DATAFORMAT_NAMES]
    return files


def conversation_stream(files: list[Path], start_file: int, start_line: int,
                        skip_non_utf8: bool = False) -> Iterator[tuple[int, int, list[tuple[str, str]]]]:
    """(file index, line index, turns) of every conversation from a position onwards (as document_stream)."""
    for file_index in range(start_file, len(files)):
        line_index = -1
        try:
            for line_index, turns in read_conversations(files[file_index], start_line if file_index == start_file else 0):
                yield file_index, line_index, turns
        except UnicodeDecodeError:
            bad = NotUTF8(files[file_index], *(first_undecodable(files[file_index]) or ()))
            if not skip_non_utf8:
                raise bad from None
            print(skipped_warning(bad, line_index + 1), file=sys.stderr)


def document_stream(files: list[Path], start_file: int, start_document: int,
                    skip_non_utf8: bool = False) -> Iterator[tuple[int, int, str]]:
    """(file index, document index, text) from a position onwards, in corpus order. A file that is not
    UTF-8 raises NotUTF8, or with skip_non_utf8 ends there with a warning (a plain-text or xz file
    before any of its documents; a jsonl-like one after the documents before its bad line)."""
    for file_index in range(start_file, len(files)):
        skip = start_document if file_index == start_file else 0
        document_index = -1
        try:
            for document_index, text in enumerate(read_documents(files[file_index])):
                if document_index >= skip:
                    yield file_index, document_index, text
        except NotUTF8 as err:
            if not skip_non_utf8:
                raise
            print(skipped_warning(err, document_index + 1), file=sys.stderr)


def batched(stream: Iterator[tuple[int, int, str]], size: int) -> Iterator[list[tuple[int, int, str]]]:
    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- progress: what an interrupted run needs to continue exactly --------------------------------


@dataclass
class Progress:
    settings: dict
    shards_written: int = 0
    next_file: int = 0  # the first document not yet turned into records
    next_document: int = 0
    documents: int = 0
    tokens: int = 0
    skipped_documents: int = 0
    complete: bool = False
    shard_names: list = field(default_factory=list)


def progress_path(output_dir: str, name: str) -> str:
    return storage.join(output_dir, f".{name}.progress.npz")


def save_progress(output_dir: str, name: str, progress: Progress, pending: list[np.ndarray], carry: np.ndarray) -> None:
    """Atomically record the progress and the tokens already read but not yet in a shard (locally
    a temporary file renamed; on a bucket one upload)."""
    masked = [r for r in pending if isinstance(r, MaskedRecord)]
    texts = [r.text if isinstance(r, MaskedRecord) else r for r in pending]
    lengths = np.asarray([len(r) for r in texts], dtype=np.int64)
    flat = np.concatenate(texts) if pending else np.zeros(0, dtype=np.int32)
    masks = np.concatenate([r.target_mask for r in masked]) if masked else np.zeros(0, dtype=np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, state=np.array(json.dumps(asdict(progress))), pending_lengths=lengths,
             pending_tokens=flat.astype(np.int32), pending_masks=masks.astype(np.int32), carry=carry.astype(np.int32))
    storage.write_bytes(progress_path(output_dir, name), buffer.getvalue())


def load_progress(output_dir: str, name: str) -> tuple[Progress, list[np.ndarray], np.ndarray] | None:
    path = progress_path(output_dir, name)
    if not storage.exists(path):
        return None
    with np.load(io.BytesIO(storage.read_bytes(path))) as saved:
        progress = Progress(**json.loads(str(saved["state"])))
        splits = np.cumsum(saved["pending_lengths"])[:-1]
        pending = list(np.split(saved["pending_tokens"], splits)) if len(saved["pending_lengths"]) else []
        if progress.settings["mode"] == "conversations":
            pending = [MaskedRecord(text, mask) for text, mask in zip(pending, np.split(saved["pending_masks"], splits))]
        return progress, pending, saved["carry"]


def settings_of(args: argparse.Namespace, files: list[Path], tokenizer_id: str, separator: list[int],
                template: dict | None = None) -> dict:
    settings = {
        # relative to --input_dir, so that a run may be continued from another working directory
        "files": [[str(p.relative_to(args.input_dir)) if p.is_relative_to(args.input_dir) else p.name,
                   p.stat().st_size] for p in files],
        "tokenizer": tokenizer_id,
        "separator": separator,
        "minimum_size": args.minimum_size,
        "chunk_size": args.chunk_size,
        "files_per": args.files_per,
        "mode": args.mode,
        "ftfy": args.ftfy,
        "wikitext_detokenize": args.wikitext_detokenize,
        "skip_non_utf8": args.skip_non_utf8,
        "documents_per_task": DOCUMENTS_PER_TASK,
    }
    if template is not None:
        settings["conversation_template"] = template
    return settings


def tokenizer_identity(encoder_path: str, is_pretrained: bool, tokenizer) -> str:
    if is_pretrained:
        return f"pretrained:{encoder_path}"
    return "sha256:" + hashlib.sha256(storage.read_bytes(tokenizer.source)).hexdigest()


# --- the run -----------------------------------------------------------------------------------


def parse_separator(words: list[str] | None, tokenizer) -> list[int]:
    """The separator's ids from --separator's words: ids (`0 1`), GPT-Neo's list form (`[0]`,
    `[0, 1]`), or both; each must be a token of the tokenizer."""
    if words is None:
        if tokenizer.eos_id is None:
            raise ConfigError(f"--separator: the tokenizer {tokenizer.source} has no <|endoftext|> token; "
                             "give the separator id explicitly, e.g. --separator 0")
        return [tokenizer.eos_id]
    ids = []
    for word in words:
        try:
            value = json.loads(word)
        except json.JSONDecodeError:
            value = None
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ConfigError(f"--separator {' '.join(words)}: {word!r} is not a token id or a list of them; "
                              "e.g. --separator 0, --separator 0 1 or --separator \"[0]\"")
        ids += values
    beyond = [i for i in ids if i >= tokenizer.vocab_size]
    if beyond:
        raise ConfigError(f"--separator {' '.join(words)}: id {beyond[0]} is not in the tokenizer {tokenizer.source} "
                          f"(vocabulary {tokenizer.vocab_size})")
    return ids


def main(argv: list[str] | None = None) -> list[Path | str]:
    args = parse_args(argv)
    from encoders import load_tokenizer

    # a name (gpt2) is a pretrained tokenizer; a path that does not exist is a mistake, not a name
    names_a_path = "/" in args.encoder_path or os.sep in args.encoder_path or args.encoder_path.endswith(".json")
    is_pretrained = not names_a_path and not storage.exists(args.encoder_path)
    try:
        tokenizer = load_tokenizer(args.encoder_path, is_pretrained)
    except ConfigError as err:
        raise ConfigError(f"--encoder_path: {err}") from None
    separator = parse_separator(args.separator, tokenizer)
    template = load_template(args.conversation_template) if args.mode == "conversations" else None
    try:
        files = input_files(args.input_dir, args.file_type, args.mode)
    except FileNotFoundError as err:
        raise ConfigError(f"--input_dir: {err}") from None
    if not files:
        raise ConfigError(f"--input_dir {args.input_dir}: no input files found (searched recursively"
                         + (f" for *.{args.file_type})" if args.file_type else
                            " for *.jsonl, as --mode conversations reads)" if args.mode == "conversations" else
                            f" for {', '.join(DEFAULT_SUFFIXES)}); set --file_type for other extensions"))

    output_dir = args.output_dir  # a local folder or gs://...: every file goes through storage
    storage.makedirs(output_dir)

    def shard_path(shard_name: str) -> Path | str:
        path = storage.join(output_dir, shard_name)
        return path if storage.is_remote(path) else Path(path)

    settings = settings_of(args, files, tokenizer_identity(args.encoder_path, is_pretrained, tokenizer), separator,
                           template)
    saved = load_progress(output_dir, args.name)
    if saved is None:
        progress, pending, carry = Progress(settings=settings), [], np.zeros(0, dtype=np.int32)
    else:
        progress, pending, carry = saved
        if progress.settings != settings:
            changed = sorted(k for k in settings if progress.settings.get(k) != settings[k])
            raise ConfigError(
                f"{output_dir} holds a run named {args.name!r} made with different inputs or flags "
                f"({', '.join(changed)} differ). Rerun with the same ones to continue it, or choose another "
                "--name or --output_dir."
            )
        if progress.complete:
            print(f"{output_dir}: {args.name!r} is already complete ({progress.shards_written} shards, "
                  f"{progress.tokens} tokens); nothing to do")
            if args.write_dataset_config:
                write_dataset_config(args, tokenizer, is_pretrained, separator, template)
            return [shard_path(n) for n in progress.shard_names]
        print(f"resuming {args.name!r}: {progress.shards_written} shards written, continuing at file "
              f"{progress.next_file + 1}/{len(files)}, document {progress.next_document}")
    unfinished = [f"{args.name}_*.tfrecords.tmp-*", f"{storage.name(progress_path(output_dir, args.name))}.tmp-*"]
    for stale in [path for pattern in unfinished for path in storage.glob(storage.join(output_dir, pattern))]:
        storage.rm(stale)  # a shard (or progress file) an interrupted run had not finished; rewritten below

    record_length = args.chunk_size + 1
    separator_array = np.asarray(separator, dtype=np.int32)

    def write_next_shard(records: list[np.ndarray]) -> None:
        shard = f"{args.name}_{progress.shards_written}_{len(records)}.tfrecords"
        write_shard(storage.join(output_dir, shard), records)
        progress.shards_written += 1
        progress.shard_names.append(shard)

    read = conversation_stream if args.mode == "conversations" else document_stream
    stream = read(files, progress.next_file, progress.next_document, args.skip_non_utf8)
    tasks = batched(stream, DOCUMENTS_PER_TASK)
    processes = max(1, args.processes)
    worker_args = (args.encoder_path, is_pretrained, args.ftfy, args.wikitext_detokenize, template, separator)
    pool = None
    if processes > 1:
        # spawn, not fork: a tokenizer that already ran its threads in this process (training one, say)
        # leaves a forked child deadlocked
        pool = multiprocessing.get_context("spawn").Pool(processes, _init_worker, worker_args)
        results = pool.imap(_encode_batch_task, tasks, chunksize=1)
    else:
        _init_worker(*worker_args)
        results = map(_encode_batch_task, tasks)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc=args.name, dynamic_ncols=True, mininterval=0.5)
    start, run_tokens = time.perf_counter(), 0
    try:
        for batch_positions, encoded in results:
            for (file_index, document_index), ids in zip(batch_positions, encoded):
                progress.next_file, progress.next_document = file_index, document_index + 1
                length = len(ids.text) if isinstance(ids, MaskedRecord) else len(ids)
                if length < args.minimum_size:
                    progress.skipped_documents += 1
                    continue
                progress.documents += 1
                progress.tokens += length
                run_tokens += length
                if args.mode == "conversations":
                    pending.append(ids)
                elif args.mode == "documents":
                    pending.append(np.concatenate([ids, separator_array]))
                else:
                    carry = np.concatenate([carry, ids, separator_array])
                    full = len(carry) // record_length * record_length
                    if full:
                        pending.extend(carry[:full].reshape(-1, record_length))
                        carry = carry[full:]
                while len(pending) >= args.files_per:
                    write_next_shard(pending[: args.files_per])
                    pending = pending[args.files_per:]
                    save_progress(output_dir, args.name, progress, pending, carry)
            if bar is not None:
                bar.update(len(encoded))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{run_tokens / elapsed:,.0f} tokens/s, {progress.shards_written} shards",
                                    refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()

    if progress.tokens == 0:  # nothing to train on: an error, not an empty success
        raise DataError(f"--input_dir {args.input_dir}: no tokens to write: {len(files)} file(s), "
                        f"{progress.skipped_documents} document(s), none with at least --minimum_size "
                        f"{args.minimum_size} tokens; no shards written")
    if len(carry):  # the corpus's last tokens: a shorter record rather than lost text
        pending.append(carry)
        carry = carry[:0]
    if pending:
        write_next_shard(pending)
        pending = []
    progress.next_file, progress.next_document = len(files), 0
    progress.complete = True
    save_progress(output_dir, args.name, progress, pending, carry)
    elapsed = time.perf_counter() - start
    print(f"{args.name}: {progress.shards_written} shards in {output_dir}, {progress.documents} documents, "
          f"{progress.tokens} tokens ({progress.skipped_documents} documents under --minimum_size "
          f"{args.minimum_size} skipped); this run: {run_tokens / max(elapsed, 1e-9):,.0f} tokens/s")
    if args.write_dataset_config:
        write_dataset_config(args, tokenizer, is_pretrained, separator, template)
    return [shard_path(n) for n in progress.shard_names]


def write_dataset_config(args: argparse.Namespace, tokenizer, is_pretrained: bool, separator: list[int],
                         template: dict | None = None) -> str:
    """--write_dataset_config: <dataset_config_dir>/<name>.json naming these shards and this tokenizer
    (and for conversations their template, which --predict renders a conversation prompt with), for
    a model config's `datasets` to use as <name>. An existing one that says something else is
    refused, not overwritten."""
    output_dir = args.output_dir if storage.is_remote(args.output_dir) else os.path.abspath(args.output_dir)
    encoder = args.encoder_path if is_pretrained or storage.is_remote(tokenizer.source) else os.path.abspath(tokenizer.source)
    padding_id = tokenizer.tokenizer.token_to_id("<|padding|>")
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else separator[-1]
    values = {
        "n_vocab": tokenizer.vocab_size,
        "path": storage.join(output_dir, f"{args.name}_*.tfrecords"),
        "eval_path": "",
        "tokenizer_is_pretrained": is_pretrained,
        "tokenizer_path": encoder,
        "eos_id": eos_id,
        "padding_id": padding_id if padding_id is not None else eos_id,
    }
    if template is not None:
        values["conversation_template"] = template
    path = storage.join(args.dataset_config_dir, f"{args.name}.json")
    text = json.dumps(values, indent=2) + "\n"
    if storage.exists(path) and storage.read_text(path) != text:
        raise ConfigError(f"--write_dataset_config: {path} exists and describes other shards or another tokenizer; "
                          "delete it, or choose another --name or --dataset_config_dir")
    storage.makedirs(args.dataset_config_dir)
    storage.write_text(path, text)
    entry = f'["{args.name}", 1, "conversations", weight]' if template is not None else \
        f'["{args.name}", stitch, mode, weight]'
    print(f"dataset config: {path} (use it as {entry} in a model config's datasets)")
    return path


def _encode_batch_task(batch: list[tuple[int, int, str]]) -> tuple[list[tuple[int, int]], list]:
    positions = [(file_index, document_index) for file_index, document_index, _ in batch]
    if _worker_options["template"] is not None:
        return positions, _encode_conversations([turns for _, _, turns in batch])
    return positions, _encode_documents([text for _, _, text in batch])


if __name__ == "__main__":
    sys.exit(run_command(main))  # a mistake or bad data: one `error:` line, exit code 2
