"""dsoft bench backbone: both checkpointing settings of a model timed in one run; models without it get one row."""
import json

from dsoft_dist.bench.backbone import main


def test_times_checkpointing_off_and_on_side_by_side(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["--models", "iresnet_tiny", "mobilefacenet_tiny", "--input-size", "32", "--batch", "4", "--dim", "16",
               "--steps", "1", "--repeats", "1", "--warmup", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [(r["model"], r["activation_checkpointing"]) for r in records] == [
        ("iresnet_tiny", False), ("iresnet_tiny", True), ("mobilefacenet_tiny", False)]
    assert all(r["s_per_step"] > 0 and r["images_per_s"] == 4 / r["s_per_step"] for r in records)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["model", "params", "ckpt", "ms/step", "images/s", "peak", "MiB", "on/off"]
    on = next(line for line in table if line.startswith("iresnet_tiny") and " on " in line)
    assert float(on.split()[-1]) == round(records[1]["s_per_step"] / records[0]["s_per_step"], 2)


def test_refuses_cuda_without_a_gpu_and_bad_sizes():
    import pytest
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            main(["--device", "cuda"])
    with pytest.raises(ValueError, match="--batch 0 is invalid"):
        main(["--batch", "0", "--device", "cpu"])
