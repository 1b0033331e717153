"""Documents of a corpus, in a fixed order, from every format the data tools accept.

lm_dataformat's formats (jsonl, jsonl.zst, json.zst, jsonl.zst.tar, dat.zst, txt, zip, tar.gz,
gz, OpenWebText's xz archives) are read by lm_dataformat; any other `.xz` is read as an xz
tarball of text files (one document each) or as xz-compressed text; every other extension
(for example `.py`) is plain text, one document per file.

Text must be UTF-8. A file that is not stops the tools with an error naming it and the first bad
byte, or, with their `--skip_non_utf8`, is left out with a warning naming it: the two tools, which
read the same corpus, treat the same files alike.
"""

from __future__ import annotations

import io
import lzma
import tarfile
from collections.abc import Iterator
from pathlib import Path

import lm_dataformat

from errors import DataError


class NotUTF8(DataError):
    """A corpus file that is not UTF-8 text: names the file and its first bad byte."""

    def __init__(self, path: Path | str, offset: int | None = None, byte: int | None = None, member: str = ""):
        where = f"{path}" + (f" (member {member})" if member else "")
        self.what = f"{where}: not UTF-8 text" + (f" (byte {offset} is {byte:#04x})" if offset is not None else "")
        super().__init__(f"{self.what}; the corpus is read as UTF-8: convert the file (e.g. iconv -f latin1 -t utf-8), "
                         "leave it out, or pass --skip_non_utf8 to skip such files with a warning")

LM_DATAFORMAT_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.zst.tar", ".json.zst", ".dat.zst", ".zip", ".tar.gz",
                          ".json.gz", ".gz")
# suffixes lm_dataformat reads itself but by whole file name rather than extension
LM_DATAFORMAT_NAMES = ("openwebtext.tar.xz",)


def find_files(base_dir: str, file_type: str | None) -> list[Path]:
    """Files under base_dir (recursively) ending in `.file_type`; all readable files when None. Sorted."""
    base = Path(base_dir)
    if base.is_file():
        return [base]
    if not base.is_dir():
        raise FileNotFoundError(f"{base_dir}: no such file or folder")
    if file_type:
        suffix = "." + file_type.lstrip(".")
        files = [p for p in base.rglob(f"*{suffix}") if p.is_file()]
    else:
        files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted(files)


def _read_text(data: bytes, path: Path, member: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NotUTF8(path, err.start, data[err.start], member) from None


def _read_xz(path: Path) -> Iterator[str]:
    with lzma.open(path) as compressed:
        data = compressed.read()
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data))
    except tarfile.ReadError:
        yield _read_text(data, path)
        return
    with archive:
        # every member is decoded before any is yielded: a file is used whole or not at all
        texts = [_read_text(archive.extractfile(m).read(), path, m.name) for m in archive.getmembers() if m.isfile()]
    yield from texts


def _read_lm_dataformat(path: Path) -> Iterator[str]:
    try:
        for document in lm_dataformat.Reader(str(path)).stream_data():
            yield document if isinstance(document, str) else str(document)
    except UnicodeDecodeError:
        # an uncompressed file's bad byte can be found; inside a compressed one it has no useful offset
        at = first_undecodable(path) if path.name.endswith(".jsonl") else None
        raise NotUTF8(path, *(at or ())) from None


def read_documents(path: Path | str) -> Iterator[str]:
    """Every document of one file, in file order; NotUTF8 for a file that is not UTF-8 text."""
    path = Path(path)
    name = path.name
    if name.endswith(".txt") or not (name.endswith(LM_DATAFORMAT_SUFFIXES) or name in LM_DATAFORMAT_NAMES
                                     or name.endswith(".xz")):
        yield _read_text(path.read_bytes(), path)
    elif name.endswith(".xz") and name not in LM_DATAFORMAT_NAMES:
        yield from _read_xz(path)
    else:
        yield from _read_lm_dataformat(path)


def first_undecodable(path: Path) -> tuple[int, int] | None:
    """(byte offset, byte value) of the first byte of a plain-text file that is not UTF-8, or None;
    read in pieces, so that a large file is never held whole."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the next piece in the file
    with open(path, "rb") as f:
        while True:
            piece = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # a character's first bytes, kept from the last piece
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as err:  # err.start counts from the held bytes
                return offset - held + err.start, err.object[err.start]
            if not piece:
                return None
            offset += len(piece)


def skipped_warning(err: NotUTF8, documents_used: int) -> str:
    """The line --skip_non_utf8 prints for a file it leaves out."""
    rest = f"the rest of it, after its first {documents_used} document(s), is skipped" if documents_used else "skipped"
    return f"warning: {err.what}: {rest} (--skip_non_utf8)"
