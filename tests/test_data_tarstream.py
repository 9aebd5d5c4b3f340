"""The shard tar reader against Python's tarfile: the same (name, bytes) in every tar format; a corrupt
or cut archive is refused (bad checksum, cut inside a header or a member, no end-of-archive blocks),
where stream-mode tarfile refuses only the cut member and reads the others as a shorter archive."""
import io
import tarfile

import pytest

from dsoft_dist.data.tarstream import TarFormatError, iter_members

LONG = "d/" + ("n" * 60 + "/") * 2 + "k.jpg"  # over ustar's 100-byte name field: prefix, GNU 'L' or pax 'path'


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        names = ["d/k1.jpg", "d/k1.cls", "k2.f16", "empty.txt", LONG]
        if fmt == tarfile.PAX_FORMAT:
            names.append("d/visage-\u00e9.cls")  # non-ASCII: pax 'path' record
        for i, name in enumerate(names):
            data = bytes(range(256)) * i + b"x" * (i * 37)  # 0 .. ~1.5 KB, not block multiples
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5 if fmt == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d/link")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.jpg"
        tar.addfile(link)
    return buf.getvalue()


def _reference(blob: bytes):
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


class _Trickle(io.RawIOBase):
    """A pipe-like stream: short reads of 1..700 bytes."""

    def __init__(self, blob: bytes):
        self.blob, self.pos, self.n = blob, 0, 0

    def readable(self):
        return True

    def read(self, size=-1):
        self.n += 1
        size = min(size if size >= 0 else len(self.blob), 1 + (self.n * 7919) % 700)
        out = self.blob[self.pos:self.pos + size]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile_in_every_format_and_on_short_reads(fmt):
    blob = _archive(fmt)
    expected = _reference(blob)
    assert LONG in [n for n, _ in expected] and len(expected) >= 5
    assert list(iter_members(io.BytesIO(blob))) == expected
    assert list(iter_members(_Trickle(blob))) == expected


def test_corrupt_and_truncated_archives_are_refused():
    blob = _archive(tarfile.GNU_FORMAT)
    whole = len(_reference(blob))
    flipped = bytearray(blob)
    flipped[512 * 2 + 10] ^= 0x20  # a name byte of the second header: its checksum no longer matches
    cases = {"bad tar header checksum": bytes(flipped),
             "ends inside member data": blob[:512 * 3 + 100],
             "ends inside a tar header": blob[:512 * 2 + 100],
             "without the end-of-archive blocks": blob[:512 * 2]}
    for message, damaged in cases.items():
        with pytest.raises(TarFormatError, match=message):
            list(iter_members(io.BytesIO(damaged)))
        if message == "ends inside member data":
            with pytest.raises(tarfile.ReadError):
                _reference(damaged)
        else:  # stream-mode tarfile takes these for the end of the archive and silently drops the rest
            assert len(_reference(damaged)) < whole
