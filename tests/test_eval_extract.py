"""Embedding extraction: flip semantics, batch-size invariance, input kinds, preallocated output, mode restore."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dsoft_dist.eval import extract_embeddings
from dsoft_dist.eval.extract import images_to_tensor
from dsoft_dist.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("iresnet_tiny", embedding_size=16, input_size=32)
    m(torch.randn(8, 3, 32, 32))  # non-trivial BN running stats
    return m.train()  # extraction must switch to eval itself


def images(n=10, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_flip_is_normalized_sum_of_image_and_mirror(model):
    imgs = images(5)
    got = extract_embeddings(model, imgs, batch_size=2, flip=True)
    model.eval()
    with torch.no_grad():
        x = images_to_tensor(imgs)
        expected = torch.nn.functional.normalize(model(x) + model(x.flip(3)), dim=1).numpy()
        plain = torch.nn.functional.normalize(model(x), dim=1).numpy()
    model.train()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # flip really changes the result
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_mode_is_restored_and_batch_size_does_not_matter(model):
    imgs = images(11)
    a = extract_embeddings(model, imgs, batch_size=3)
    b = extract_embeddings(model, imgs, batch_size=11)
    assert model.training
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_input_kinds_agree(model):
    imgs = images(6)
    from_arrays = extract_embeddings(model, imgs, batch_size=4)
    from_bytes = extract_embeddings(model, [png(im) for im in imgs], batch_size=4, progress=True)
    from_tensor = extract_embeddings(model, images_to_tensor(imgs), batch_size=4)
    np.testing.assert_allclose(from_bytes, from_arrays, atol=1e-6)
    np.testing.assert_allclose(from_tensor, from_arrays, atol=1e-6)
    # images at another resolution are resized to the model's input size
    big = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.NEAREST)) for im in imgs])
    assert extract_embeddings(model, big).shape == (6, 16)


def test_into_memmap_and_vectors(tmp_path, model):
    imgs = images(7)
    out = np.lib.format.open_memmap(str(tmp_path / "e.npy"), mode="w+", dtype=np.float32, shape=(7, 16))
    res = extract_embeddings(model, imgs, batch_size=3, out=out)
    assert res is out
    np.testing.assert_allclose(np.load(str(tmp_path / "e.npy")), extract_embeddings(model, imgs), atol=1e-6)
    mlp = build_model("mlp", embedding_size=8, in_features=5)
    assert extract_embeddings(mlp, np.random.rand(9, 5).astype(np.float32), batch_size=4).shape == (9, 8)
    with pytest.raises(ValueError, match="flip=True needs image inputs"):
        extract_embeddings(mlp, np.random.rand(9, 5).astype(np.float32), flip=True)
    with pytest.raises(ValueError, match="uint8 \\(N, H, W, 3\\)"):
        extract_embeddings(model, np.zeros((2, 32, 32), np.int32))
