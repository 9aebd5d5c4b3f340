"""Safe .bin loading: valid files round-trip (several layouts), malicious pickles are refused and run nothing."""
import builtins
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
from PIL import Image

from dsoft_dist.eval import BinFormatError, decode_images, load_bin, write_bin


def encode(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_valid_bin_round_trips(tmp_path):
    imgs = random_images(6)
    issame = [True, False, True]
    path = str(tmp_path / "set.bin")
    write_bin(path, [encode(im) for im in imgs], issame)
    bins, flags = load_bin(path)
    assert flags.dtype == bool and flags.tolist() == issame
    assert all(isinstance(b, bytes) for b in bins)
    np.testing.assert_array_equal(decode_images(bins, 16), imgs)  # PNG is lossless
    assert decode_images(bins[:2], 8).shape == (2, 8, 8, 3)  # resized on request


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_insightface_layouts(tmp_path, protocol):
    imgs = random_images(4, seed=protocol)
    layouts = [
        ([encode(im, "JPEG") for im in imgs], [np.bool_(True), np.bool_(False)]),  # numpy bool scalars
        ([bytearray(encode(im)) for im in imgs], np.array([True, False])),  # bool array
        (imgs, [1, 0]),  # decoded uint8 array, int flags
    ]
    for i, data in enumerate(layouts):
        path = tmp_path / f"l{i}.bin"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        bins, flags = load_bin(str(path))
        assert flags.tolist() == [True, False] and len(bins) == 4
        if i == 2:
            np.testing.assert_array_equal(np.stack(bins), imgs)


class RunsCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsSubprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


class RunsExec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("payload_cls", [RunsCommand, RunsSubprocess, RunsExec])
@pytest.mark.parametrize("where", ["top", "image", "flag"])
def test_malicious_bin_is_rejected_and_nothing_runs(tmp_path, payload_cls, where):
    marker = tmp_path / "pwned"
    evil = payload_cls(marker)
    # sanity: a plain pickle.loads of this payload WOULD create the marker (so the test can fail)
    if where == "top":
        pickle.loads(pickle.dumps(payload_cls(tmp_path / "control")))
        assert (tmp_path / "control").exists()
    data = {"top": evil, "image": ([b"x", evil], [True]), "flag": ([b"x", b"y"], [evil])}[where]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(BinFormatError, match="not allowed"):
        load_bin(str(path))
    assert not marker.exists()


def test_object_arrays_and_subclasses_are_refused(tmp_path):
    obj = np.array([b"a", b"b"], dtype=object)
    (tmp_path / "o.bin").write_bytes(pickle.dumps((obj, [True]), protocol=4))
    with pytest.raises(BinFormatError, match="object-dtype"):
        load_bin(str(tmp_path / "o.bin"))
    masked = np.ma.masked_array(np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "m.bin").write_bytes(pickle.dumps((masked, [True]), protocol=4))
    with pytest.raises(BinFormatError):
        load_bin(str(tmp_path / "m.bin"))


@pytest.mark.parametrize("data,match", [
    (([b"a", b"b", b"c"], [True]), "2 images per pair"),
    (([b"a", b"b"], [True, False]), "2 images per pair"),
    (([], []), "2 images per pair"),
    (([b"a", 3], [True]), "image 1 is int"),
    (([b"a", b"b"], ["yes"]), "booleans"),
    (([b"a", b"b"], [2]), "booleans"),
    ({"bins": 1}, "expected a pair"),
    ("just a string", "expected a pair"),
])
def test_malformed_bins_raise_clear_errors(tmp_path, data, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(BinFormatError, match=match):
        load_bin(str(path))


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=4)[:-5])
    with pytest.raises(BinFormatError, match="not a valid .bin"):
        load_bin(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bin(str(tmp_path / "missing.bin"))
    (tmp_path / "corrupt.bin").write_bytes(pickle.dumps(([b"notanimage", b"x"], [True]), protocol=4))
    bins, _ = load_bin(str(tmp_path / "corrupt.bin"))
    with pytest.raises(BinFormatError, match="could not decode"):
        decode_images(bins, 16)


class HugeAlloc:
    def __reduce__(self):
        return (bytes, (10**13,))  # 10 TB: would crash the machine if called


def test_allowed_builtins_cannot_allocate_arbitrary_memory(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(pickle.dumps(([HugeAlloc(), b"x"], [True]), protocol=2))
    with pytest.raises(BinFormatError, match="refusing bytes"):
        load_bin(str(path))


def test_decoded_array_layouts():
    rgb = random_images(1, size=8)[0]
    np.testing.assert_array_equal(decode_images([rgb.transpose(2, 0, 1)], 8)[0], rgb)  # CHW
    gray = rgb[..., :1]
    assert decode_images([gray], 8)[0].shape == (8, 8, 3)
    np.testing.assert_array_equal(decode_images([gray], 8)[0][..., 1], gray[..., 0])
