"""Feature-vector shards: written by `dsoft data synth --vectors` / `from-npy`, streamed exactly once per
epoch over 2 ranks x 2 DataLoader workers from uneven shards, equal to their source, trainable by the MLP."""
import io
import json

import numpy as np
import pytest
import torch

from dsoft_dist.cli import main
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import SyntheticVectors, build_train_loader, load_manifest
from dsoft_dist.data.decode import BadSample, decode_sample
from dsoft_dist.data.shards import BadData, iter_tar_samples
from dsoft_dist.data.vectors import from_npy, synth_vectors_to_shards
from dsoft_dist.errors import BadDataError


def _epoch(manifest: str, num_classes: int, rank: int, world: int, epoch: int, batch: int, workers: int = 2,
           dim: int = 16):
    cfg = DataConfig(source="webdataset", manifest=manifest, num_classes=num_classes, batch_size=batch,
                     num_workers=workers, shuffle_buffer=50, vector_dim=dim)
    loader = build_train_loader(cfg, rank, world, epoch, keys=True)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    return batches, [k for keys in loader.batch_keys for k in keys], loader


def test_synth_vector_shards_stream_every_sample_once_per_epoch_on_2_ranks_x_2_workers(tmp_path):
    # 300 identities x 2 = 600 samples in 16 shards of 37 and one of 8 (uneven, cut across ranks and workers);
    # 600 / 2 ranks / batch 20 = 15 batches: nothing is dropped, so every sample must come exactly once
    manifest = synth_vectors_to_shards(str(tmp_path), 300, 2, dim=16, per_shard=37, workers=2, progress=False)
    assert manifest.shard_counts() == [37] * 16 + [8]
    assert (manifest.sample_kind, manifest.vector_dim, manifest.vector_dtype) == ("vectors", 16, "float16")
    source = SyntheticVectors(300, dim=16, seed=0)
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            batches, keys, loader = _epoch(str(tmp_path), 300, rank, 2, epoch, batch=20)
            assert len(batches) == len(loader) == 15
            x = torch.cat([b[0] for b in batches])  # (300, 16) float32
            y = torch.cat([b[1] for b in batches])
            assert x.dtype == torch.float32 and x.shape == (300, 16)
            identity, index = (np.array([int(k.split("_")[i]) for k in keys]) for i in (0, 1))
            assert (y.numpy() == identity).all(), "a label disagrees with its sample's identity"
            expected = torch.from_numpy(source.batch(identity, index)).half().float()
            assert torch.equal(x, expected), "a streamed vector differs from its source (rounded to float16)"
            assert loader.counters["bad_total"] == 0
            seen += keys
        assert sorted(seen) == sorted(f"{i:09d}_{j:05d}" for i in range(300) for j in range(2)), "not exactly once"
        orders.append(seen)
    assert orders[0] != orders[1], "the epoch order must change with the epoch"


def test_from_npy_keeps_every_row_and_its_label_in_float32(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.standard_normal((103, 12)).astype(np.float32)
    labels = np.repeat(np.arange(21), 5)[:103]  # grouped by identity, as feature dumps usually are
    np.save(tmp_path / "f.npy", features)
    np.save(tmp_path / "l.npy", labels)
    out = tmp_path / "shards"
    assert main(["data", "from-npy", str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), str(out), "--dtype",
                 "float32", "--per-shard", "10", "--no-progress"]) == 0
    manifest = load_manifest(str(out))
    assert (manifest.num_classes, manifest.num_samples, manifest.vector_dtype) == (21, 103, "float32")
    rows = {}
    for url in manifest.shard_paths():
        for sample in iter_tar_samples(url, BadData()):
            rows[int(sample["__key__"])] = (np.frombuffer(sample["f32"], "<f4"), int(sample["cls"]))
    assert sorted(rows) == list(range(103))
    for r, (vec, label) in rows.items():
        assert np.array_equal(vec, features[r]) and label == labels[r]
    first_shard = [int(s["cls"]) for s in iter_tar_samples(manifest.shard_paths()[0], BadData())]
    assert len(set(first_shard)) > 3, "rows were not shuffled across shards"
    np.save(tmp_path / "short.npy", labels[:50])
    with pytest.raises(ValueError, match=r"\(103, 12\) and labels .* \(50,\) do not match"):
        from_npy(str(tmp_path / "f.npy"), str(tmp_path / "short.npy"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"span \[0, 20\], outside \[0, num_classes=10\)"):
        from_npy(str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), str(tmp_path / "x"), num_classes=10)
    # 103 rows on 1 rank, batch 10: 10 batches of exact rows
    batches, keys, _ = _epoch(str(out), 21, 0, 1, 0, batch=10, workers=0, dim=12)
    for (x, y), key in zip(batches, keys[::10]):
        assert torch.equal(x[0], torch.from_numpy(features[int(key)])) and y[0] == labels[int(key)]


def test_bad_vector_samples_are_counted_and_the_fail_policy_names_them(tmp_path):
    synth_vectors_to_shards(str(tmp_path), 10, 2, dim=8, per_shard=20, progress=False)
    path = load_manifest(str(tmp_path)).shard_paths()[0]
    samples = list(iter_tar_samples(path, BadData()))
    import webdataset as wds

    with wds.TarWriter(path) as sink:  # rewrite the shard with two damaged samples
        for i, s in enumerate(samples):
            d = {"__key__": s["__key__"], "cls": s["cls"]}
            if i == 3:
                d["f16"] = s["f16"][:-2]  # 7 values instead of 8
            elif i == 5:
                d["txt"] = b"no vector"
            else:
                d["f16"] = s["f16"]
            sink.write(d)
    cfg = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=10, batch_size=6, num_workers=0,
                     vector_dim=8)
    loader = build_train_loader(cfg, 0, 1, 0)
    assert sum(len(y) for _, y in loader) == 18
    assert loader.counters["bad"] == {"corrupt_vector": 1, "missing_vector": 1}
    cfg.bad_data = "fail"
    with pytest.raises(BadDataError, match=r"(has 7 values, the manifest says vector_dim=8|has no f16/f32/npy entry)"):
        list(build_train_loader(cfg, 0, 1, 0))
    # without the manifest nothing says the shard holds vectors: read as images, each sample says why it is skipped
    with pytest.raises(BadSample, match="holds a vector: vector shards are read through their manifest"):
        decode_sample(samples[0], 10, 8)


def test_vector_dim_disagreement_and_image_flags_are_refused(tmp_path, capsys):
    synth_vectors_to_shards(str(tmp_path / "v"), 10, 2, dim=8, progress=False)
    cfg = DataConfig(source="webdataset", manifest=str(tmp_path / "v"), num_classes=10, batch_size=4, vector_dim=16)
    with pytest.raises(ValueError, match="data.vector_dim=16 disagrees .* set data.vector_dim=8"):
        build_train_loader(cfg, 0, 1, 0)
    assert main(["data", "synth", str(tmp_path / "w"), "--vectors", "--identities", "5", "--image-size", "32"]) != 0
    assert main(["data", "synth", str(tmp_path / "w"), "--identities", "5", "--dim", "32"]) != 0
    err = capsys.readouterr().err
    assert "--image-size apply to images only" in err and "--dim apply to --vectors only" in err


def test_start_up_reads_no_shard_content(tmp_path):
    """Building the loader uses the manifest's counts only: with every shard emptied it still has its batches."""

    manifest = synth_vectors_to_shards(str(tmp_path), 50, 2, dim=8, per_shard=30, progress=False)
    for path in manifest.shard_paths():
        open(path, "wb").close()  # the files exist, their contents are gone
    cfg = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=50, batch_size=10, vector_dim=8)
    loader = build_train_loader(cfg, 1, 2, epoch=3)
    assert len(loader) == 5 and loader.num_samples == 100


def test_npy_and_raw_members_decode_alike():
    from dsoft_dist.data.decode import decode_vector

    vec = np.arange(6, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, vec.astype(np.float16))
    for sample in ({"npy": buf.getvalue()}, {"f16": vec.astype("<f2").tobytes()}, {"f32": vec.tobytes()}):
        got, label = decode_vector({"__key__": "k", "cls": b"4", **sample}, num_classes=5, dim=6)
        assert got.dtype == np.float32 and np.array_equal(got, vec) and label == 4


@pytest.mark.slow(reason="trains through dsoft train in a subprocess")
def test_dsoft_train_learns_from_vector_shards(tmp_path):
    out = tmp_path / "run"
    assert main(["data", "synth", str(tmp_path / "v"), "--vectors", "--identities", "200", "--samples-per-identity",
                 "16", "--dim", "32", "--no-progress"]) == 0
    code = main(["train", "--config", "configs/demo.yaml", "--nproc", "1",
                 "--set", "data.source=webdataset", "--set", f"data.manifest={tmp_path / 'v'}",
                 "--set", "data.num_classes=200", "--set", "data.vector_dim=32", "--set", "data.batch_size=64",
                 "--set", "model.name=mlp", "--set", "model.in_features=32", "--set", "model.embedding_size=32",
                 "--set", "eval.synthetic_identities=0", "--set", "schedule.steps=80",
                 "--set", "schedule.warmup_steps=5", "--set", "logging.log_every=20",
                 "--set", f"logging.output_dir={out}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["log"][-1]["loss"] < report["log"][0]["loss"] - 1.0
