"""``dsoft plan``: its closed forms, its errors, its profile, and its check against ``dsoft bench head``.

    python -m pytest tests/test_plan.py -m "not slow"   # formulas, errors, the CPU profile, the 1-rank check
    python -m pytest tests/test_plan.py                 # + the 2, 3 and 4 gloo-rank checks and the gloo profile

The validation runs the real benchmark in a subprocess with MALLOC_MMAP_THRESHOLD_=65536, so every
buffer of 64 KiB or more is its own mapping and goes back to the system when freed: peak RSS then
sees what the step allocates, not what glibc's heap happened to keep from the step before.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsoft_dist.plan import PlanInputs, build_plan
from dsoft_dist.plan.cli import main as plan_main
from dsoft_dist.plan.estimate import (
    collectives,
    head_flops,
    link_bytes,
    nearest_build,
    nearest_pairs,
    rows_per_step,
    shard_rows,
    state_bytes,
)
from dsoft_dist.plan.memory import backbone_bytes, backbone_params, transient_bytes, weight_grad_bytes
from dsoft_dist.plan.timing import predict_time

MIB = 1 << 20
BENCH = dict(classes=200_000, dim=128, batch=256, rates=(1.0, 0.015625))
NEAREST_BENCH = dict(classes=10_000, rates=(0.125, 0.015625))  # each rate's first step builds the table (C^2 D)


def _plan(**kw) -> PlanInputs:
    base = dict(classes=1_000_000, gpus=8, dim=512, batch_per_gpu=128, dtype="bf16", sample_rate=1 / 64)
    return PlanInputs(**{**base, **kw})


# ---- formulas ------------------------------------------------------------------------------------------

def test_counted_bytes_are_the_heads_collectives():
    inp = _plan(dtype="bf16")  # B = 1024, D = 512, e = 2
    by_name = {c["name"]: c["bytes"] for c in collectives(inp)}
    assert by_name == {"labels": 8 * 1024, "embeddings": 1024 * 512 * 2, "stats_max": 12 * 1024,
                       "stats_sum": 4 * 1024, "embeddings_grad": 1024 * 512 * 2}
    assert "inter_correction" in {c["name"] for c in collectives(_plan(inter_correction=True))}
    assert "inter_correction" not in {c["name"] for c in collectives(_plan(inter_correction=True, negatives="all"))}
    assert collectives(_plan(gpus=1)) == [] and link_bytes(_plan(gpus=1))["counted"] == 0


def test_bytes_per_step_grow_with_neither_classes_nor_ranks_at_a_fixed_global_batch():
    counted = {link_bytes(_plan(classes=c, gpus=p, batch_per_gpu=4096 // p))["counted"]
               for c in (10**6, 10**7, 10**8) for p in (2, 8, 64, 512)}
    assert len(counted) == 1  # O(B D + B): independent of C and of P
    per_link = [link_bytes(_plan(gpus=p, batch_per_gpu=4096 // p))["per_link"] for p in (2, 8, 64, 512)]
    assert per_link == sorted(per_link) and per_link[-1] < 2 * link_bytes(_plan(gpus=2, batch_per_gpu=2048))["counted"]


def test_ring_link_bytes_and_inter_node_links():
    inp = _plan(gpus=64, nodes=8)
    ag = next(c for c in collectives(inp) if c["name"] == "embeddings")
    ar = next(c for c in collectives(inp) if c["name"] == "stats_max")
    assert ag["link"] == pytest.approx(ag["bytes"] * 63 / 64) and ar["link"] == pytest.approx(ar["bytes"] * 2 * 63 / 64)
    links = link_bytes(inp)
    assert links["inter_links"] == 8 and links["intra_links"] == 56 and links["inter_per_link"] == links["per_link"]
    assert link_bytes(_plan(gpus=8, nodes=1))["inter_links"] == 0


def test_state_per_gpu_halves_when_the_gpus_double():
    for opt in ("sgd", "adamw"):
        totals = [state_bytes(_plan(classes=2**20, gpus=p, optimizer=opt))["total"] for p in (8, 16, 32)]
        assert totals[0] == 2 * totals[1] == 4 * totals[2]
    assert state_bytes(_plan(classes=2**20, gpus=8))["weights"] == 2**17 * 512 * 4
    assert state_bytes(_plan(classes=2**20, gpus=8, optimizer="adamw"))["optimizer"] == 2 * 2**17 * 512 * 4 + 8 * 2**17
    # the dense weight gradient dominates the r = 1 transient, so that halves too (nearly)
    dense = [transient_bytes(_plan(classes=2**24, gpus=p, negatives="all", sample_rate=1.0))["peak"] for p in (8, 16)]
    assert dense[0] / dense[1] == pytest.approx(2.0, rel=0.05)


def test_rows_per_step_per_negative_mode():
    assert shard_rows(_plan(classes=10, gpus=3)) == 4  # the largest shard
    assert rows_per_step(_plan(negatives="all")) == 125_000
    assert rows_per_step(_plan(negatives="random")) == 1954  # ceil(125000 / 64)
    assert rows_per_step(_plan(negatives="partial", sample_rate=1 / 1024)) == 1024  # max(ceil(r C_local), B)
    assert rows_per_step(_plan(negatives="batch")) == 1024


def test_a_plan_that_does_not_fit_warns():
    res = build_plan(_plan(classes=10**8, gpus=8, negatives="all", sample_rate=1.0, optimizer="adamw"))
    assert not res["memory"]["fits"] and "does not fit" in res["warnings"][0] and "--gpu-memory 80" in res["warnings"][0]
    assert build_plan(_plan(classes=10**6, gpus=8))["memory"]["fits"]
    assert not build_plan(_plan(classes=10**6, gpus=8, gpu_memory_gib=0.1))["memory"]["fits"]


def test_backbone_state_from_the_registry():
    params, buffers = backbone_params("iresnet50", 512)
    assert 43e6 < params < 44e6
    bb = backbone_bytes(_plan(), params, buffers)
    assert bb["params"] == bb["grads"] == bb["ddp_buckets"] == bb["optimizer"] == 4 * params
    assert backbone_bytes(_plan(gpus=1, optimizer="adamw"), params)["ddp_buckets"] == 0


def test_time_needs_a_measured_profile():
    res = build_plan(_plan())
    assert res["time"] is None and "--measure-profile" in res["time_note"] and "gpu_check.sh" in res["time_note"]
    gpu = {"device": "cuda", "gemm": [{"batch": 1024, "dim": 512, "k": 1954, "gflops": 1e5}],
           "elementwise": [{"elements": 2e6, "per_s": 1e11}], "memory": {"gbps": 3000.0}, "collective": None}
    t = predict_time(_plan(), gpu)
    assert t["comm_s"] is None and "--intra-gbps" in t["comm_timed_by"] and t["total_s"] is None
    t = predict_time(_plan(), gpu, intra_gbps=100.0)
    assert t["total_s"] == pytest.approx(t["compute_s"] + t["comm_s"])
    assert t["gemm_s"] == pytest.approx(8 * 1024 * 1954 * 512 / 1e14)
    assert predict_time(_plan(gpus=64, nodes=8), gpu, intra_gbps=100.0)["comm_s"] is None  # no --inter-gbps
    with pytest.raises(ValueError, match="measured on 'cuda' but --device is 'cpu'"):
        predict_time(_plan(device="cpu"), gpu)


def test_nearest_closed_forms():
    inp = _plan(negatives="nearest")  # C = 10^6 on 8 ranks: C_local = 125,000, B = 1024, D = 512, M = 8
    assert rows_per_step(inp) == 1954  # the random set, as for random
    assert nearest_pairs(inp) == {"expected": 1024, "bound": 8192}  # B M C_local / C, B M
    assert nearest_pairs(_plan(gpus=1, negatives="nearest")) == {"expected": 1024, "bound": 1024}  # exact at P = 1
    assert nearest_pairs(_plan()) == {"expected": 0, "bound": 0}
    random = state_bytes(_plan())
    assert state_bytes(inp) == {**random, "nearest": 125_000 * 8 * 12, "total": random["total"] + 12_000_000}
    assert state_bytes(_plan(classes=5, gpus=1, negatives="nearest"))["nearest"] == 5 * 4 * 12  # M <= C - 1
    by_name = {c["name"]: c for c in collectives(inp)}
    assert by_name["nearest"]["op"] == "all_reduce" and by_name["nearest"]["bytes"] == 8 * 1024 * 8
    assert by_name["nearest"]["link"] == pytest.approx(65_536 * 2 * 7 / 8)
    assert collectives(_plan(gpus=1, negatives="nearest")) == []
    assert head_flops(inp)["model"] == 6 * 1024 * 1954 * 512 + 6 * 1024 * 512
    assert weight_grad_bytes(inp) == (1954 + 1024 + 1024) * 512 * 4  # K rows, B slots, n pairs
    build = nearest_build(inp)
    assert build["flops"] == 2 * 125_000 * 10**6 * 512 and build["bytes"] == 875_000 * 512 * 4
    assert nearest_build(_plan()) is None


def test_nearest_transient_phases():
    m8, m16 = (transient_bytes(_plan(negatives="nearest", nearest_per_class=m))["phases"] for m in (8, 16))
    assert m16["backward nearest"] - m8["backward nearest"] == 6 * 1024 * 512 * 4  # 6 (n, D) fp32 per pair
    assert m16["forward nearest"] - m8["forward nearest"] == 4 * 1024 * 512 * 4
    random = transient_bytes(_plan())["phases"]
    assert m8["backward chunks"] - random["backward chunks"] == (1024 + 1024) * 512 * 4  # n D 4 in G, B D 4 waiting
    # nearest's step in backward runs from the weight's hook on a formed gradient, stepped before the embedding grad
    sib = transient_bytes(_plan(negatives="nearest", step_in_backward=True))["phases"]
    assert weight_grad_bytes(_plan(negatives="nearest", step_in_backward=True)) == weight_grad_bytes(_plan(
        negatives="nearest"))
    assert m8["embedding grad"] - sib["embedding grad"] == weight_grad_bytes(_plan(negatives="nearest"))


def test_nearest_pairs_in_the_time_model():
    gpu = {"device": "cuda", "gemm": [{"batch": 1024, "dim": 512, "k": 1954, "gflops": 1e5}],
           "elementwise": [{"elements": 2e6, "per_s": 1e11}], "memory": {"gbps": 3000.0}, "collective": None}
    t = predict_time(_plan(negatives="nearest"), gpu, intra_gbps=100.0)
    assert t["nearest_s"] == pytest.approx(18 * 1024 * 512 / 1e11)
    assert predict_time(_plan(), gpu, intra_gbps=100.0)["nearest_s"] == 0
    assert t["rows_s"] > predict_time(_plan(), gpu, intra_gbps=100.0)["rows_s"]  # the pairs' rows are stepped too


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,named", [
    (["--sample-rate", "3/2"], "--sample-rate '3/2'"),
    (["--gpus", "0"], "--gpus '0'"),
    (["--gpus", "24", "--nodes", "5"], "--nodes 5"),
    (["--classes", "4", "--gpus", "8"], "--gpus 8"),
    (["--backbone", "resnet9000"], "--backbone 'resnet9000'"),
    (["--batch-per-gpu", "0"], "--batch-per-gpu 0"),
    (["--intra-gbps", "-1"], "--intra-gbps -1"),
    (["--profile", "{tmp}/missing.json"], "missing.json"),
    (["--profile", "{tmp}/bad.json"], "--profile"),
    (["--negatives", "nearest", "--nearest-per-class", "0"], "--nearest-per-class 0"),
    (["--nearest-per-class", "4"], "--nearest-per-class 4"),
])
def test_bad_input_is_one_error_line_naming_the_value(argv, named, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    base = {"--classes": "1000000", "--gpus": "8"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value.replace("{tmp}", str(tmp_path))
    assert plan_main([x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsoft plan: error:") and named.replace("{tmp}", "") in err[0], err


def test_inputs_name_field_and_fix():
    with pytest.raises(ValueError, match=r"--dtype 'fp8' is invalid \(dtype\): use one of"):
        _plan(dtype="fp8")
    with pytest.raises(ValueError, match="--step-in-backward needs --head-mode sparse"):
        _plan(step_in_backward=True, head_mode="dense")
    with pytest.raises(ValueError, match=r"--nearest-per-class 4 is read only with --negatives nearest, not 'random'"):
        _plan(nearest_per_class=4)
    with pytest.raises(ValueError, match=r"--nearest-per-class 0 is invalid \(nearest_per_class\)"):
        _plan(negatives="nearest", nearest_per_class=0)
    with pytest.raises(ValueError, match="--inter-correction is invalid with --negatives nearest"):
        _plan(negatives="nearest", inter_correction=True)
    with pytest.raises(ValueError, match="--negatives nearest is invalid with --classes 1"):
        _plan(classes=1, gpus=1, negatives="nearest")


# ---- the command ---------------------------------------------------------------------------------------

def test_text_and_json_output(capsys):
    argv = ["--classes", "1e6", "--gpus", "8", "--dim", "512", "--batch-per-gpu", "128", "--dtype", "bf16",
            "--optimizer", "sgd", "--negatives", "random", "--sample-rate", "1/64", "--backbone", "iresnet50"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    for text in ("head weights", "optimizer state", "transient workspace", "backbone iresnet50",
                 "activations not included", "embeddings_grad", "model 6 B K D", "time: not predicted"):
        assert text in out, out
    assert plan_main(argv + ["--json", "--sample-rate", "1,1/64", "--gpus", "8,64"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(p["inputs"]["gpus"], p["inputs"]["negatives"]) for p in doc["plans"]] == \
        [(8, "all"), (8, "random"), (64, "all"), (64, "random")]  # r = 1 is planned as negatives=all
    assert doc["plans"][3]["inputs"]["nodes"] == 8 and doc["assumptions"]
    assert plan_main(argv + ["--negatives", "nearest", "--nearest-per-class", "4"]) == 0
    assert "nearest pairs: n = 512 " in capsys.readouterr().out  # B M C_local / C = 1024 4 / 8
    assert plan_main(argv + ["--negatives", "nearest", "--sample-rate", "1,1/64", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]  # r = 1 is planned as negatives=all, M left at its default
    assert [(p["inputs"]["negatives"], p["inputs"]["nearest_per_class"]) for p in plans] == [("all", 8), ("nearest", 8)]
    assert plans[0]["nearest"] is None and plans[1]["nearest"]["expected"] == 1024


def test_cpu_profile_is_measured_written_and_used(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    argv = ["--classes", "20000", "--gpus", "1", "--dim", "64", "--batch-per-gpu", "64", "--dtype", "fp32",
            "--sample-rate", "1,1/16", "--device", "cpu"]
    assert plan_main(argv + ["--measure-profile", str(path), "--no-collective"]) == 0
    capsys.readouterr()
    prof = json.loads(path.read_text())
    assert prof["device"] == "cpu" and prof["collective"] is None
    assert {(g["batch"], g["dim"]) for g in prof["gemm"]} == {(64, 64)} and all(g["gflops"] > 0 for g in prof["gemm"])
    assert prof["memory"]["gbps"] > 0 and len(prof["step"]) == 2
    assert plan_main(argv + ["--profile", str(path), "--json"]) == 0
    times = [p["time"] for p in json.loads(capsys.readouterr().out)["plans"]]
    assert all(t["total_s"] > 0 and t["comm_s"] == 0.0 for t in times)  # one rank: no communication


@pytest.mark.slow(reason="spawns 2 gloo processes to measure the collectives")
@pytest.mark.dist
def test_cpu_profile_measures_gloo_between_two_processes(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    argv = ["--classes", "20000", "--gpus", "2", "--dim", "64", "--batch-per-gpu", "64", "--dtype", "fp32",
            "--device", "cpu", "--measure-profile", str(path)]
    assert plan_main(argv) == 0
    assert "gloo between 2 local processes, from the profile" in capsys.readouterr().out
    coll = json.loads(path.read_text())["collective"]
    assert coll["processes"] == 2 and all(coll[op]["gbps"] > 0 for op in ("all_gather", "reduce_scatter", "all_reduce"))


# ---- validation against dsoft bench head ----------------------------------------------------------------

def _bench(world_size: int, tmp_path, chunk_size: int = 0, negatives: str = "random") -> dict:
    sizes = {**BENCH, **(NEAREST_BENCH if negatives == "nearest" else {})}
    out = tmp_path / f"bench-{world_size}-{chunk_size}-{negatives}.json"
    cmd = [sys.executable, "-m", "dsoft_dist.bench.head", "--classes", str(sizes["classes"]), "--dim", str(BENCH["dim"]),
           "--batch", str(BENCH["batch"]), "--sample-rates", *map(str, sizes["rates"]), "--repeats", "1",
           "--warmup", "1", "--world-size", str(world_size), "--chunk-size", str(chunk_size), "--negatives", negatives,
           "--json", str(out)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_against_bench(world_size: int, tmp_path, chunk_size: int = 0, negatives: str = "random") -> None:
    measured = _bench(world_size, tmp_path, chunk_size, negatives)
    for row in measured["rows"]:
        r = row["rate"]
        inp = PlanInputs(classes=measured["args"]["classes"], gpus=world_size, dim=BENCH["dim"],
                         batch_per_gpu=BENCH["batch"], dtype="fp32", optimizer="sgd",
                         negatives="all" if r >= 1 else negatives, sample_rate=r, device="cpu",
                         backend="cpu-c" if measured["backend"] == "cpu-c (compiled)" else "torch",
                         chunk_size=chunk_size)
        res = build_plan(inp)
        where = f"P={world_size} r={r:g} {inp.negatives}"
        assert res["rows_per_step"] == row["k"], where
        if inp.negatives == "nearest":  # the pairs rank 0 computed: B M at one rank; near B M C_local / C on P
            pairs = res["nearest"]
            assert row["nearest_pairs"] <= pairs["bound"], where
            if world_size == 1:
                assert row["nearest_pairs"] == pairs["expected"] == BENCH["batch"] * 8, where
            else:
                assert row["nearest_pairs"] == pytest.approx(pairs["expected"], rel=0.10), (where, row["nearest_pairs"])
        assert res["memory"]["head"]["total"] == row["state"], where  # exact
        planned = {c["name"]: c["bytes"] for c in res["collectives"]}
        assert res["links"]["counted"] == row["bytes"], (where, planned, row.get("bytes_by_name"))  # exact
        if row.get("bytes_by_name"):
            assert planned == row["bytes_by_name"], where
        transient = res["memory"]["transient"]["peak"]
        assert transient == pytest.approx(row["transient"], rel=0.10), \
            (where, transient / MIB, row["transient"] / MIB, res["memory"]["transient"]["phases"])


def test_plan_matches_bench_head_on_one_rank(tmp_path):
    _check_against_bench(1, tmp_path)


def test_plan_matches_bench_head_nearest_on_one_rank(tmp_path):
    _check_against_bench(1, tmp_path, negatives="nearest")  # n = B M = 2048 pairs: their phases are the peak


@pytest.mark.slow(reason="dsoft bench head at C = 200,000 in a subprocess (~5 s)")
def test_plan_matches_bench_head_with_more_rows_than_a_chunk(tmp_path):
    _check_against_bench(1, tmp_path, chunk_size=512)  # K = 3125 sampled rows in 7 chunks


@pytest.mark.slow(reason="dsoft bench head at C = 200,000 on P gloo processes (~9-25 s)")
@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_plan_matches_bench_head_on_gloo_ranks(world_size, tmp_path):
    _check_against_bench(world_size, tmp_path)


@pytest.mark.slow(reason="dsoft bench head --negatives nearest at C = 10,000 on P gloo processes, a table build each")
@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, 4])
def test_plan_matches_bench_head_nearest_on_gloo_ranks(world_size, tmp_path):
    _check_against_bench(world_size, tmp_path, negatives="nearest")
