"""InsightFace / MXNet RecordIO (train.rec + train.idx) without mxnet: reader and writer.

Layout (dmlc-core recordio, as MXNet writes it):

- a record is ``uint32 magic 0xced7230a | uint32 lrec | data | zero pad to 4 bytes``,
  little-endian, with ``lrec = cflag << 29 | length``. cflag 0 = whole record; a
  payload that contains the magic at a 4-aligned offset is split there into parts
  with cflag 1 (first), 2 (middle), 3 (last); the magic itself is dropped and the
  reader puts it back between parts.
- the .idx file is text, one ``index<TAB>byte offset`` line per record.
- each payload starts with MXNet's IRHeader ``struct '<IfQQ'`` = (flag, label, id, id2);
  when flag > 0, ``flag`` float32 labels follow and label is that array. The rest is the
  encoded image.
- InsightFace's record 0 is a header record with flag > 0 and label = (a, b): images
  are records 1..a-1 and identity records a..b-1 (one per class, label = its image
  range), so there are b - a classes.

    python -c "from dsoft_dist.data.recordio import RecordReader; r = RecordReader('train.rec'); print(len(r), r.header0)"
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from dsoft_dist.observability import get_logger

log = get_logger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A malformed record; the message names the record index and byte offset."""


@dataclass
class IRHeader:
    """MXNet image-record header: flag = number of extra float labels (0: scalar label)."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, payload: bytes) -> bytes:
    """IRHeader + payload -> record bytes (mxnet.recordio.pack)."""
    label = np.atleast_1d(np.asarray(header.label, dtype=np.float32))
    if label.size > 1 or header.flag > 0:
        head = struct.pack(_IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes()
    else:
        head = struct.pack(_IR_FORMAT, 0, float(label[0]), header.id, header.id2)
    return head + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload) (mxnet.recordio.unpack)."""
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id1, id2 = struct.unpack(_IR_FORMAT, record[:_IR_SIZE])
    rest = record[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"IRHeader says {flag} float labels but only {len(rest)} bytes follow")
        return IRHeader(flag, np.frombuffer(rest[:4 * flag], dtype=np.float32).copy(), id1, id2), rest[4 * flag:]
    return IRHeader(flag, label, id1, id2), rest


def scalar_label(header: IRHeader) -> int:
    """The class of an image record (first element when the label is an array)."""
    label = header.label
    return int(label[0]) if isinstance(label, np.ndarray) else int(label)


def read_index(idx_path: str) -> dict[int, int]:
    """Parses a .idx file into {record index: byte offset}."""
    index = {}
    with open(idx_path, encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise RecordIOError(f"{idx_path}:{n}: expected 'index<TAB>offset', got {line.strip()!r}")
            index[int(parts[0])] = int(parts[1])
    return index


class RecordReader:
    """Random access to a .rec through its .idx (``idx_path`` defaults to PATH.idx)."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        for path in (rec_path, idx_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} does not exist: InsightFace data sets ship train.rec with train.idx")
        self.rec_path, self.idx_path = rec_path, idx_path
        self.index = read_index(idx_path)
        self.keys = sorted(self.index)
        self._f = open(rec_path, "rb")
        self._size = os.path.getsize(rec_path)
        self.header0 = None  # (first identity record, end) when record 0 is InsightFace's header
        if 0 in self.index:
            try:
                head, _ = unpack(self.read(0))
            except RecordIOError as exc:  # not an image record either: reported when it is read again
                log.warning("%s: record 0 is not an InsightFace header record (%s)", rec_path, exc)
                head = IRHeader(0, 0.0)
            if head.flag >= 2:
                self.header0 = (int(head.label[0]), int(head.label[1]))

    def __len__(self) -> int:
        return len(self.keys)

    def image_keys(self) -> list[int]:
        """Record indices of the images (all records when there is no header record)."""
        if self.header0 is None:
            return self.keys
        return [k for k in self.keys if 0 < k < self.header0[0]]

    def num_classes(self) -> int | None:
        """b - a from the header record, or None when there is none."""
        return None if self.header0 is None else self.header0[1] - self.header0[0]

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records joined). Raises RecordIOError."""
        if key not in self.index:
            raise RecordIOError(f"record {key} is not in {self.idx_path}")
        offset = self.index[key]
        self._f.seek(offset)
        parts = []
        while True:
            head = self._f.read(8)
            if len(head) < 8:
                raise RecordIOError(f"record {key} at offset {offset}: file ends inside the record header")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"record {key} at offset {offset}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})"
                                    " - the .rec is corrupt or the .idx does not belong to it")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = self._f.read((length + 3) & ~3)
            if len(data) < length:
                raise RecordIOError(f"record {key} at offset {offset}: truncated ({len(data)} of {length} bytes)")
            parts.append(data[:length])
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            if cflag not in (1, 2):
                raise RecordIOError(f"record {key} at offset {offset}: invalid continuation flag {cflag}")

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordWriter:
    """Writes a .rec/.idx pair exactly as MXNet's MXIndexedRecordIO does (used by tests)."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec = open(rec_path, "wb")
        self.idx = open(idx_path or os.path.splitext(rec_path)[0] + ".idx", "w", encoding="ascii")

    def write(self, key: int, payload: bytes) -> None:
        """Appends one record; payloads holding the magic at aligned offsets are split."""
        self.idx.write(f"{key}\t{self.rec.tell()}\n")
        pos, n = 0, len(payload)
        cuts = [i for i in range(0, n - 3, 4) if payload[i:i + 4] == _MAGIC_BYTES]
        for i in cuts:
            self._part(1 if pos == 0 else 2, payload[pos:i])
            pos = i + 4
        self._part(3 if cuts else 0, payload[pos:])

    def _part(self, cflag: int, data: bytes) -> None:
        self.rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(data)))
        self.rec.write(data + b"\0" * (-len(data) % 4))

    def close(self) -> None:
        self.rec.close()
        self.idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_insightface_rec(rec_path: str, images: list[bytes], labels: list[int]) -> None:
    """Writes an InsightFace-style train.rec/.idx: header record 0, images 1..n, then one
    identity record per class (labels must be grouped by class, as InsightFace sorts them)."""
    n = len(images)
    classes = sorted(set(labels))
    with RecordWriter(rec_path) as w:
        w.write(0, pack(IRHeader(2, np.array([n + 1, n + 1 + len(classes)], np.float32)), b""))
        for i, (img, label) in enumerate(zip(images, labels), 1):
            w.write(i, pack(IRHeader(0, float(label), i, 0), img))
        for j, c in enumerate(classes):
            members = [i + 1 for i, label in enumerate(labels) if label == c]
            w.write(n + 1 + j, pack(IRHeader(2, np.array([members[0], members[-1] + 1], np.float32)), b""))
