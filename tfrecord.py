"""TFRecord shards without TensorFlow: GPT-Neo's shard format, read and written.

A TFRecord file is a sequence of records, each laid out as

    length        uint64, little endian
    length_crc    uint32, little endian: masked CRC-32C of the 8 length bytes
    data          `length` bytes
    data_crc      uint32, little endian: masked CRC-32C of the data

and each record's data is a serialized `tf.train.Example` holding one int64 feature `text`:
the token ids of one chunk, one document or one conversation. A conversation's record holds a
second int64 feature `target_mask`, as long as `text`: 1 where the token is the assistant's
(what the target-masked loss scores), 0 elsewhere. Readers of `text` never look at it. The protobuf is encoded and decoded by hand here
(the message is tiny and fixed), and the packed varints are decoded with numpy.

Both `data/create_tfrecords.py` and `inputs.py` go through this module, so the two agree on
every byte. Files are opened with fsspec: local paths and gs:// take the same code path.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

import fsspec
import google_crc32c
import numpy as np

from errors import DataError

T = TypeVar("T")

HEADER_BYTES = 12  # length + length_crc
FOOTER_BYTES = 4  # data_crc
FEATURE_NAME = b"text"
TARGET_MASK = b"target_mask"


# --- checksums --------------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    # The format masks the CRC so that a CRC of data that itself contains CRCs stays well mixed.
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf: tf.train.Example{features: Features{feature: map<string, Feature>}} -------------
# Field numbers: Example.features = 1; Features.feature = 1 (map entry: key = 1, value = 2);
# Feature.int64_list = 3; Int64List.value = 1 (packed varints).


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint_bytes(field << 3 | 2) + _varint_bytes(len(payload)) + payload


def encode_varints(ids: np.ndarray) -> bytes:
    """Packed base-128 varints of non-negative integers, vectorised."""
    values = np.asarray(ids, dtype=np.uint64)
    if values.size == 0:
        return b""
    # bytes each value needs: 1 + floor(bit_length / 7), computed without a Python loop
    n_bytes = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):
        n_bytes += values >= np.uint64(1) << np.uint64(7 * k)
    ends = np.cumsum(n_bytes)
    starts = ends - n_bytes
    position = np.arange(ends[-1]) - np.repeat(starts, n_bytes)
    value_of_byte = np.repeat(values, n_bytes)
    out = ((value_of_byte >> (7 * position).astype(np.uint64)) & np.uint64(0x7F)).astype(np.uint8)
    continued = np.ones(out.shape, dtype=bool)
    continued[ends - 1] = False
    out[continued] |= 0x80
    return out.tobytes()


def decode_varints(buffer: bytes | np.ndarray) -> np.ndarray:
    """Packed base-128 varints -> uint64 array, vectorised (no loop over values).

    A value's bytes run from its start up to the first byte below 0x80, least significant first.
    The loop below is over byte positions within a value (at most 10, and 2 or 3 for token ids).
    """
    raw = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise ValueError("packed varints end in the middle of a value")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 10:
        raise ValueError("a varint is longer than 10 bytes")
    wide = np.uint32 if longest <= 4 else np.uint64  # 4 bytes hold 28 bits: every realistic token id
    low = (raw & 0x7F).astype(wide)
    values = low[starts]
    for k in range(1, longest):
        more = lengths > k
        values |= (low[np.minimum(starts + k, raw.size - 1)] * more.astype(wide)) << wide(7 * k)
    return values.astype(np.uint64, copy=False)


class MaskedRecord(NamedTuple):
    """A conversation's record: its token ids and, as long, its target mask (1: a scored token)."""

    text: np.ndarray
    target_mask: np.ndarray


def _int64_feature_entry(name: bytes, values) -> bytes:
    int64_list = _length_delimited(1, encode_varints(np.asarray(values, dtype=np.int64)))
    return _length_delimited(1, _length_delimited(1, name) + _length_delimited(2, _length_delimited(3, int64_list)))


def encode_example(example: np.ndarray | list[int] | MaskedRecord) -> bytes:
    """Serialized tf.train.Example with the int64 feature `text` holding the ids, and for a
    MaskedRecord the int64 feature `target_mask` after it."""
    if isinstance(example, MaskedRecord):
        if len(example.text) != len(example.target_mask):
            raise ValueError(f"a target mask of {len(example.target_mask)} values for {len(example.text)} tokens")
        entries = _int64_feature_entry(FEATURE_NAME, example.text) + _int64_feature_entry(TARGET_MASK,
                                                                                          example.target_mask)
    else:
        entries = _int64_feature_entry(FEATURE_NAME, example)
    return _length_delimited(1, entries)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("message ends inside a varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field; varint fields give their value as start."""
    pos, end = start, len(data) if end is None else end
    while pos < end:
        tag, pos = _read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > end:
                raise ValueError("a field runs past the end of its message")
            yield field, wire, pos, pos + size
            pos += size
        elif wire == 0:
            value, pos = _read_varint(data, pos)
            yield field, wire, value, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _feature_span(data: bytes, name: bytes = FEATURE_NAME) -> tuple[int, int]:
    """Byte span of the Int64List message of feature `name` inside a serialized Example."""
    for field, wire, start, end in _fields(data):
        if field != 1 or wire != 2:
            continue
        for f_field, f_wire, e_start, e_end in _fields(data, start, end):
            if f_field != 1 or f_wire != 2:
                continue
            key, value = None, None
            for m_field, m_wire, m_start, m_end in _fields(data, e_start, e_end):
                if m_field == 1 and m_wire == 2:
                    key = data[m_start:m_end]
                elif m_field == 2 and m_wire == 2:
                    value = (m_start, m_end)
            if key != name or value is None:
                continue
            for v_field, v_wire, l_start, l_end in _fields(data, *value):
                if v_field == 3 and v_wire == 2:
                    return l_start, l_end
            raise ValueError(f"feature '{name.decode()}' is not an int64 list")
    raise ValueError(f"the Example has no feature '{name.decode()}'")


def decode_example(data: bytes, start: int = 0, stop: int | None = None, name: bytes = FEATURE_NAME) -> np.ndarray:
    """Values [start:stop] (int64) of int64 feature `name` (the token ids: `text`) in a serialized
    Example; ValueError if malformed.

    A slice is cheaper than the whole record: value boundaries are found with one comparison per
    byte, and only the values inside the slice are decoded.
    """
    span_start, span_end = _feature_span(data, name)
    parts: list[np.ndarray] = []  # packed runs as raw bytes, unpacked values as decoded arrays, in order
    packed_runs = 0
    for field, wire, v_start, v_end in _fields(data, span_start, span_end):
        if field != 1:
            continue
        if wire == 2:  # packed, as TensorFlow writes it
            parts.append(np.frombuffer(data, dtype=np.uint8, count=v_end - v_start, offset=v_start))
            packed_runs += 1
        else:  # unpacked: one varint field per value; the protobuf spec lets writers do either
            parts.append(np.array([v_start], dtype=np.uint64))
    if len(parts) == 1 and packed_runs == 1:
        raw = parts[0]
        if start == 0 and stop is None:
            return decode_varints(raw).view(np.int64)
        ends = np.flatnonzero(raw < 0x80)
        first, last = slice(start, stop).indices(len(ends))[:2]
        if last <= first:
            return np.zeros(0, dtype=np.int64)
        begin = int(ends[first - 1]) + 1 if first > 0 else 0
        return decode_varints(raw[begin:int(ends[last - 1]) + 1]).view(np.int64)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    values = [decode_varints(p) if p.dtype == np.uint8 else p for p in parts]
    return np.concatenate(values).view(np.int64)[start:stop]


# --- writing -----------------------------------------------------------------------------------


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return b"".join(
        (length, struct.pack("<I", masked_crc32c(length)), data, struct.pack("<I", masked_crc32c(data)))
    )


def write_shard(path: str, examples: Iterable[np.ndarray | list[int] | MaskedRecord]) -> int:
    """Write examples to `path` atomically (a temporary name, then rename); returns their count.

    A crash leaves either the complete shard or no shard under `path`, never a truncated one.
    """
    fs, fs_path = fsspec.core.url_to_fs(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols and "local" not in protocols:
        # an object store's upload is atomic already (the object appears when it completes), and a
        # rename there is a copy and a delete
        with fs.open(fs_path, "wb") as out:
            count = 0
            for ids in examples:
                out.write(frame_record(encode_example(ids)))
                count += 1
        return count
    temporary = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    count = 0
    with fs.open(temporary, "wb") as out:
        for ids in examples:
            out.write(frame_record(encode_example(ids)))
            count += 1
        if hasattr(out, "flush"):
            out.flush()
        if hasattr(out, "fileno"):
            try:
                os.fsync(out.fileno())
            except (OSError, ValueError):
                pass
    fs.mv(temporary, fs_path)
    return count


# --- reading -----------------------------------------------------------------------------------


class ShardReader:
    """Random access to the records of one shard: an index of record offsets, then seek + read.

    The index is built by reading the 12-byte headers only and seeking over the payloads, so a
    shard's records are found without reading its data.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None
        self._offsets: np.ndarray | None = None
        self._lengths: np.ndarray | None = None

    def _open(self):
        if self._file is None:
            try:
                # readahead: gcsfs's default ("adaptive") runs a background prefetcher, which random
                # access does not use and which outlives a reader dropped without close()
                self._file = fsspec.open(self.path, "rb", cache_type="readahead").open()
            except FileNotFoundError:
                raise DataError(f"{self.path}: shard not found") from None
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # handles do not cross process boundaries; reopen on first use
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def adopt_index(self, scan: ShardScan) -> None:
        """Use the offsets a full scan already found instead of reading the headers again."""
        self._offsets, self._lengths = scan.offsets, scan.lengths

    def build_index(self) -> None:
        f = self._open()
        f.seek(0, os.SEEK_END)
        size = f.tell()
        offsets, lengths = [], []
        offset = 0
        while offset < size:
            f.seek(offset)
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES:
                raise DataError(
                    f"{self.path}: truncated shard: record header at byte offset {offset} has "
                    f"{len(header)} of {HEADER_BYTES} bytes (file size {size})"
                )
            (length,) = struct.unpack_from("<Q", header)
            (length_crc,) = struct.unpack_from("<I", header, 8)
            if masked_crc32c(header[:8]) != length_crc:
                raise DataError(f"{self.path}: corrupt shard: bad length checksum of the record at byte offset {offset}")
            end = offset + HEADER_BYTES + length + FOOTER_BYTES
            if end > size:
                raise DataError(
                    f"{self.path}: truncated shard: the record at byte offset {offset} needs {length} data bytes "
                    f"and ends at byte {end}, past the end of the file ({size} bytes)"
                )
            offsets.append(offset)
            lengths.append(length)
            offset = end
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self.build_index()
        return self._offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def read_record(self, index: int) -> bytes:
        """The checked data bytes of record `index`."""
        offset = int(self.offsets[index])
        length = int(self._lengths[index])
        f = self._open()
        f.seek(offset + HEADER_BYTES)
        blob = f.read(length + FOOTER_BYTES)
        if len(blob) < length + FOOTER_BYTES:
            raise DataError(f"{self.path}: truncated shard: the record at byte offset {offset} is cut short")
        data = blob[:length]
        (data_crc,) = struct.unpack_from("<I", blob, length)
        if masked_crc32c(data) != data_crc:
            raise DataError(f"{self.path}: corrupt shard: bad data checksum of the record at byte offset {offset}")
        return data

    def _decoded(self, index: int, decode: Callable[[bytes], T], expected: str) -> T:
        """decode(data of record `index`); a malformed record is a DataError naming the shard, the
        record's byte offset and what `expected` it to be."""
        data = self.read_record(index)
        try:
            return decode(data)
        except ValueError as err:
            raise DataError(
                f"{self.path}: record at byte offset {int(self.offsets[index])} is not {expected}: {err}"
            ) from None

    def read_ids(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [start:stop] of record `index` (int64)."""
        return self._decoded(index, lambda data: decode_example(data, start, stop),
                             "a tf.train.Example with an int64 feature 'text'")

    def read_conversation(self, index: int) -> MaskedRecord:
        """Token ids and target mask (int64) of record `index`, a conversation's, read once."""
        record = self._decoded(
            index, lambda data: MaskedRecord(decode_example(data), decode_example(data, name=TARGET_MASK)),
            "a conversation's tf.train.Example (int64 features 'text' and 'target_mask', "
            "as data/create_tfrecords.py --mode conversations writes)")
        if len(record.text) != len(record.target_mask):
            raise DataError(f"{self.path}: record at byte offset {int(self.offsets[index])} holds "
                            f"{len(record.text)} tokens but {len(record.target_mask)} target-mask values")
        return record

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self.read_ids(index)


def read_shard(path: str) -> list[np.ndarray]:
    """All examples of a shard, in order."""
    reader = ShardReader(path)
    try:
        return list(reader)
    finally:
        reader.close()


# --- scanning: every record of a shard checked once, in one read ---------------------------------


class ShardScan:
    """What one full read of a shard tells: record offsets, token counts and the id range."""

    def __init__(self, path: str, offsets: np.ndarray, lengths: np.ndarray, token_counts: np.ndarray,
                 last_ids: np.ndarray, min_id: int, max_id: int, max_id_offset: int):
        self.path = path
        self.last_ids = last_ids  # each record's last token id (-1 when empty)
        self.offsets = offsets
        self.lengths = lengths
        self.token_counts = token_counts
        self.min_id = min_id
        self.max_id = max_id
        self.max_id_offset = max_id_offset  # byte offset of the first record holding max_id


def scan_shard(path: str) -> ShardScan:
    """Read a whole shard, verifying every checksum and decoding every record."""
    try:
        with fsspec.open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found") from None
    size = len(blob)
    offsets, lengths, counts, last_ids, minima, maxima = [], [], [], [], [], []
    offset = 0
    while offset < size:
        if offset + HEADER_BYTES > size:
            raise DataError(f"{path}: truncated shard: record header at byte offset {offset} has "
                            f"{size - offset} of {HEADER_BYTES} bytes (file size {size})")
        (length,) = struct.unpack_from("<Q", blob, offset)
        (length_crc,) = struct.unpack_from("<I", blob, offset + 8)
        if masked_crc32c(blob[offset:offset + 8]) != length_crc:
            raise DataError(f"{path}: corrupt shard: bad length checksum of the record at byte offset {offset}")
        end = offset + HEADER_BYTES + length + FOOTER_BYTES
        if end > size:
            raise DataError(f"{path}: truncated shard: the record at byte offset {offset} needs {length} data "
                            f"bytes and ends at byte {end}, past the end of the file ({size} bytes)")
        data = blob[offset + HEADER_BYTES:offset + HEADER_BYTES + length]
        (data_crc,) = struct.unpack_from("<I", blob, end - FOOTER_BYTES)
        if masked_crc32c(data) != data_crc:
            raise DataError(f"{path}: corrupt shard: bad data checksum of the record at byte offset {offset}")
        try:
            ids = decode_example(data)
        except ValueError as err:
            raise DataError(f"{path}: record at byte offset {offset} is not a tf.train.Example with an int64 "
                            f"feature 'text': {err}") from None
        offsets.append(offset)
        lengths.append(length)
        counts.append(len(ids))
        last_ids.append(ids[-1] if len(ids) else -1)
        minima.append(ids.min() if len(ids) else np.iinfo(np.int64).max)
        maxima.append(ids.max() if len(ids) else -1)
        offset = end
    maxima_array = np.asarray(maxima, dtype=np.int64)
    top = int(np.argmax(maxima_array)) if len(maxima_array) else 0
    return ShardScan(
        path,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(counts, dtype=np.int64),
        np.asarray(last_ids, dtype=np.int64),
        int(min(minima)) if minima else 0,
        int(maxima_array[top]) if len(maxima_array) else -1,
        int(offsets[top]) if offsets else 0,
    )
