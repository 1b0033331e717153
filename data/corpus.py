"""Documents of a corpus, in a fixed order, from every format the data tools accept.

lm_dataformat's formats (jsonl, jsonl.zst, json.zst, jsonl.zst.tar, dat.zst, txt, zip, tar.gz,
gz, OpenWebText's xz archives) are read by lm_dataformat; any other `.xz` is read as an xz
tarball of text files (one document each) or as xz-compressed text; every other extension
(for example `.py`) is plain text, one document per file.
"""

from __future__ import annotations

import io
import lzma
import tarfile
from collections.abc import Iterator
from pathlib import Path

import lm_dataformat

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


def _read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _read_xz(path: Path) -> Iterator[str]:
    with lzma.open(path) as compressed:
        data = compressed.read()
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            for member in members:
                yield _read_text(archive.extractfile(member).read())
    except tarfile.ReadError:
        yield _read_text(data)


def read_documents(path: Path | str) -> Iterator[str]:
    """Every document of one file, in file order."""
    path = Path(path)
    name = path.name
    if name.endswith(".txt") or not (name.endswith(LM_DATAFORMAT_SUFFIXES) or name in LM_DATAFORMAT_NAMES
                                     or name.endswith(".xz")):
        yield _read_text(path.read_bytes())
    elif name.endswith(".xz") and name not in LM_DATAFORMAT_NAMES:
        yield from _read_xz(path)
    else:
        for document in lm_dataformat.Reader(str(path)).stream_data():
            yield document if isinstance(document, str) else str(document)
