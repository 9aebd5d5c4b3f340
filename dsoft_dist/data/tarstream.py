"""A sequential tar reader for shard streams: (name, bytes) of each regular file, in order.

Python's ``tarfile`` builds a TarInfo object per member and parses every header field; on a
shard of small members (a 128-d float16 vector is 256 bytes, its class 3) that is ~35 us a
member, which caps a loader worker near 14k vector samples/s. A shard only needs each member's
name and bytes, so this reader parses just those fields from the 512-byte headers and reads
the data. It works on any readable binary stream (files, ``pipe:`` stdout), never seeks, and
refuses a corrupt or cut stream (``TarFormatError``): a header whose checksum is wrong, a
stream that ends inside a header or a member, or before the end-of-archive blocks. (Stream-mode
tarfile refuses only the cut member; the others it reads as the end of a shorter archive.) Formats: ustar / GNU (with the ustar
name prefix, GNU long names ``L``) and POSIX pax (``x`` records: ``path``, ``size``; global
``g`` records are skipped). Directories, links and other non-file members are skipped.

    python -c "from dsoft_dist.data.tarstream import iter_members as m; print([n for n, _ in m(open('x.tar', 'rb'))])"
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

BLOCK = 512
_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (old and new style), contiguous file


class TarFormatError(ValueError):
    """The stream is not a readable tar: bad header checksum, truncated header or member."""


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (high bit of the first byte set)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b" \0").lstrip(b" ")
    return int(text, 8) if text else 0


def _read(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise TarFormatError(f"the stream ends inside {what} ({len(data)} of {n} bytes)")
        data += more
    return data


def _pax(data: bytes) -> dict[str, str]:
    """POSIX pax records 'LEN key=value\\n' -> {key: value}."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _checked(header: bytes, offset: int) -> None:
    stored = _number(header[148:156])
    if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
        raise TarFormatError(f"bad tar header checksum at byte {offset}: the shard is corrupt")


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yields (name, data) for each regular file member of the tar ``stream``, in archive order.

    Raises TarFormatError on a corrupt or truncated archive (members read before stay yielded).
    """
    offset, long_name, pax = 0, None, {}
    while True:
        header = stream.read(BLOCK)
        if not header:  # every tar writer ends with zero blocks: a stream without them was cut short
            raise TarFormatError(f"the stream ends at byte {offset} without the end-of-archive blocks")
        if len(header) < BLOCK:
            header += _read(stream, BLOCK - len(header), "a tar header")
        if header == _ZERO:
            return  # the end-of-archive blocks
        _checked(header, offset)
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        padded = -(-size // BLOCK) * BLOCK  # the data and its padding to whole blocks, in one read
        data = _read(stream, padded, f"member data at byte {offset}")[:size] if size else b""
        offset += BLOCK + padded
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header of the next member
            pax = _pax(data)
            continue
        if kind == b"g":  # pax global header
            continue
        name = long_name or pax.get("path") or _ustar_name(header)
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            yield name, data


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar (old GNU headers keep other fields there)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")
