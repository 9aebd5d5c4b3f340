"""Multi-process (gloo, CPU) tests of ShardedClassifier against the single-process references.

One spawned process group per world size P in (1, 2, 3, 4) runs every case (all losses x
all negative modes x chunked/unchunked, plus the inter correction) and writes its results
to files; the parent recomputes the references (dsoft_dist.losses.functional on the full
(B, C) cosine matrix, negatives rebuilt per shard with select_shard_classes) and compares
the loss, every rank's local-embedding gradient and the full weight gradient.
The P=2 group also measures the bytes moved per step at C and 10 C, checks that a bad
label fails on every rank naming the rank, and writes a head checkpoint after 3 steps
that the P=1 and P=3 groups load to take step 4 (the re-shard test); negatives="nearest"
is checked against its reference table (tests/test_head_nearest.py), and its table is
re-sharded by that checkpoint.

    python -m pytest tests/test_head_dist.py -m dist
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer, load_head_checkpoint, save_head_checkpoint
from dsoft_dist.losses import NEGATIVES
from dsoft_dist.losses import functional as LF
from dsoft_dist.losses.negatives import class_mask, select_shard_classes
from dsoft_dist.parallel import shard_range, shard_ranges
from dsoft_dist.parallel.processes import distributed, spawn_local
from dsoft_dist.registry import LOSSES as REGISTERED_LOSSES
from tests.test_head_nearest import reference_lookup, reference_nearest_loss, reference_row_bias, reference_table

pytestmark = pytest.mark.dist
# one spawned group per world size (4-13 s each); the default tier runs the P = 2 group's cases
OTHER_P = pytest.mark.slow(reason="one more spawned gloo group per world size; P = 2 is the default tier's")


def sizes(*world_sizes: int) -> list:
    """The world sizes as parameters, every one but P = 2 marked slow."""
    return [p if p == 2 else pytest.param(p, marks=OTHER_P) for p in world_sizes]


C, D, B_LOCAL, RATE, SEED, DRAWS = 37, 8, 5, 0.3, 3, 2
LOSSES = ("d_softmax", "arcface", "cosface", "sphereface", "normface", "softmax")
CASES = ([(loss, neg, chunk, False) for loss in LOSSES for neg in NEGATIVES for chunk in (0, 4)]
         + [("d_softmax", neg, 4, True) for neg in ("batch", "random", "partial")])  # nearest refuses it
NEAREST_PER_CLASS = 8  # the head's default
RESHARD = {"sgd": OptimizerConfig(name="sgd", lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01),
           "adamw": OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1)}
IN_BACKWARD_OPT = {"sgd": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
             "adamw": OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1)}
RESHARD_BATCH = 12  # divisible by 1, 2 and 3
WORLD_SIZES = (1, 2, 3, 4)
COMM_WORLD_SIZES = (1, 2, 3, 4, 8)  # P = 8 runs only the communication count
COMM_BATCH = 24  # the global batch of the communication count: divisible by every P there
# two fp32 runs that sum in different orders (chunk sizes, world sizes): a few 1e-6 of the largest
# entry, since the chunk loops round each base-2 logit s log2(e) cos ~ 92 to ~8e-6 absolute
FP32_PATHS_ATOL = 5e-6


def global_data(world_size: int, step: int = 0, batch: int | None = None):
    """The global batch (B, D), labels (B,) with -1, 0 and C-1 present, and the full weight (C, D)."""
    batch = batch or world_size * B_LOCAL
    gen = torch.Generator().manual_seed(1000 * world_size + step)
    emb = torch.randn(batch, D, generator=gen)
    labels = torch.randint(0, C, (batch,), generator=gen)
    labels[0], labels[1], labels[-1] = -1, C - 1, 0
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
    return emb, labels, weight


# ----------------------------------------------------------------------------- worker side

def _run_case(case, rank, world_size):
    loss_name, neg, chunk, corr = case
    emb, labels, weight = global_data(world_size)
    head = ShardedClassifier(C, D, loss=loss_name, negatives=neg, sample_rate=RATE, chunk_size=chunk, seed=SEED,
                             inter_correction=corr)
    head.draws = DRAWS
    with torch.no_grad():
        head.weight.copy_(weight[head.class_start:head.class_start + head.num_local_classes])
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    local = emb[rows].clone().requires_grad_(True)
    local_labels = labels[rows].clone()
    loss = head(local, local_labels)
    loss.backward()
    grad_w = head.weight.grad
    return {"loss": loss.detach(), "grad_emb": local.grad, "sparse": grad_w.is_sparse,
            "grad_w": grad_w.to_dense() if grad_w.is_sparse else grad_w, "diag": head.diagnostics(),
            "labels_untouched": torch.equal(local_labels, labels[rows]), "draws_after": head.draws}


def _comm_bytes(rank, world_size):
    """Per (C, negatives): the counted collectives of a first (validated) and a second (steady) step, at the
    global batch COMM_BATCH whatever P is."""
    out = {}
    for num_classes in (40, 400):
        for neg in NEGATIVES:
            head = ShardedClassifier(num_classes, D, negatives=neg, sample_rate=0.25,
                                     inter_correction=neg != "nearest")  # nearest's sum is weighted already
            for step in ("first", "steady"):
                emb = torch.randn(COMM_BATCH // world_size, D, requires_grad=True)
                labels = torch.randint(0, num_classes, (COMM_BATCH // world_size,))
                head.comm.reset()
                head(emb, labels).backward()
                out[(num_classes, neg, step)] = head.comm.snapshot()
    return out


def _bad_inputs(rank, world_size):
    """Bad labels / an uneven batch on the last rank: every rank must raise (no hang), naming that rank."""
    head = ShardedClassifier(C, D)
    messages = []
    for bad in (C + 3, -5, "uneven"):
        rows = B_LOCAL + (1 if bad == "uneven" and rank == world_size - 1 else 0)
        labels = torch.zeros(rows, dtype=torch.int64)
        if rank == world_size - 1 and bad != "uneven":
            labels[2] = bad
        try:
            head(torch.randn(rows, D), labels)
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    try:
        ShardedClassifier(world_size - 1, D)
        messages.append(None)
    except ValueError as exc:
        messages.append(str(exc))
    return messages


def _reshard_step(head, opt, step, rank, world_size):
    emb, labels, _ = global_data(0, 100 + step, RESHARD_BATCH)
    per = RESHARD_BATCH // world_size
    loss = head(emb[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _reshard_head(name):
    neg = "batch" if name == "sgd" else "all"
    loss = "d_softmax" if name == "sgd" else "arcface"
    head = ShardedClassifier(C, D, loss=loss, negatives=neg, seed=SEED + 1)
    return head, build_head_optimizer(head, RESHARD[name])


def _reshard(rank, world_size, outdir, save):
    out = {}
    for name in RESHARD:
        head, opt = _reshard_head(name)
        ckpt = os.path.join(outdir, f"ckpt_{name}")
        if save:
            for step in range(3):
                _reshard_step(head, opt, step, rank, world_size)
            save_head_checkpoint(ckpt, head, opt)
        else:
            load_head_checkpoint(ckpt, head, opt)
        loss = _reshard_step(head, opt, 3, rank, world_size)
        out[name] = {"loss": loss, "weight": head.weight.detach().clone(), "start": head.class_start}
    head = ShardedClassifier(C, D, negatives="nearest", sample_rate=RATE, seed=SEED, nearest_refresh=2)
    opt = build_head_optimizer(head, RESHARD["sgd"])
    if save:  # builds at draws 0 and 2
        for step in range(3):
            _reshard_step(head, opt, step, rank, world_size)
        save_head_checkpoint(os.path.join(outdir, "ckpt_nearest"), head, opt)
    else:
        load_head_checkpoint(os.path.join(outdir, "ckpt_nearest"), head, opt)
    out["nearest_table"] = {"ids": head.nearest.ids.clone(), "cos": head.nearest.cos.clone(),
                            "built_at": head.nearest.built_at, "every": head.nearest.every}
    return out


def _in_backward_runs(rank, world_size):
    """3 steps per (optimizer, negatives), with the head optimizer stepping in backward and after it."""
    out = {}
    for name, cfg in IN_BACKWARD_OPT.items():
        for neg in ("all", "batch", "random"):
            for in_backward in (False, True):  # unit-norm-sized rows and a moderate lr: 3 steps stay well conditioned
                head = ShardedClassifier(C, D, loss="d_softmax" if name == "sgd" else "arcface", negatives=neg,
                                         sample_rate=RATE, seed=SEED, chunk_size=4, init_std=0.3)
                opt = build_head_optimizer(head, dataclasses.replace(cfg, head_step_in_backward=in_backward))
                losses = torch.stack([_reshard_step(head, opt, step, rank, world_size) for step in range(3)])
                out[(name, neg, in_backward)] = {"loss": losses, "weight": head.weight.detach().clone(),
                                           "state": {k: v.clone() for k, v in opt.state[head.weight].items()}}
    return out


def _worker(outdir, tasks):
    with distributed("gloo", timeout_s=120) as env:
        torch.set_num_threads(1)
        rank, world_size = env.rank, env.world_size
        out = {}
        if "parity" in tasks:
            out["parity"] = [_run_case(case, rank, world_size) for case in CASES]
        if "comm" in tasks:
            out["comm"] = _comm_bytes(rank, world_size)
        if "in_backward" in tasks:
            out["in_backward"] = _in_backward_runs(rank, world_size)
        if "bad_inputs" in tasks:
            out["bad_inputs"] = _bad_inputs(rank, world_size)
        if "reshard_save" in tasks or "reshard_load" in tasks:
            out["reshard"] = _reshard(rank, world_size, outdir, save="reshard_save" in tasks)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- parent side

_RESULTS: dict[int, list[dict]] = {}


def run_group(world_size: int, tmp_root) -> list[dict]:
    """Spawns (once per session) the P-rank gloo group and returns every rank's results."""
    if world_size not in _RESULTS:
        tasks = ["comm"]
        if world_size in WORLD_SIZES:
            tasks += ["parity"] + (["in_backward"] if world_size < 4 else [])
        if world_size == 2:
            tasks += ["bad_inputs", "reshard_save"]
        if world_size in (1, 3):
            run_group(2, tmp_root)  # writes the checkpoint these groups load
            tasks.append("reshard_load")
        outdir = tmp_root / f"p{world_size}"
        outdir.mkdir(exist_ok=True)
        if world_size in (1, 3):
            for name in (*RESHARD, "nearest"):
                link = outdir / f"ckpt_{name}"
                if not link.is_symlink():
                    os.symlink(tmp_root / "p2" / f"ckpt_{name}", link)
        spawn_local(_worker, world_size, (str(outdir), tasks))
        _RESULTS[world_size] = [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return _RESULTS[world_size]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("head_dist")


def reference(case, world_size):
    """Single-process loss and gradients (emb (B, D), weight (C, D)) with the shards' negative sets."""
    loss_name, neg, _, corr = case
    emb, labels, weight = global_data(world_size)
    emb.requires_grad_(True)
    weight.requires_grad_(True)
    parts = [select_shard_classes("random" if neg == "nearest" else neg, labels, s, n, RATE, SEED, DRAWS, p)
             for p, (s, n) in enumerate(shard_ranges(C, world_size))]
    if neg == "nearest":  # the table of the weight the head holds at this forward, looked up for the batch
        neighbours = reference_lookup(labels, reference_table(weight, NEAREST_PER_CLASS)[0])
        loss = reference_nearest_loss(loss_name, emb, weight, labels,
                                      reference_row_bias(labels, neighbours, parts, world_size, C))
        loss.backward()
        return loss.detach(), emb.grad, weight.grad
    starts = [s for s, _ in shard_ranges(C, world_size)]
    classes = None if neg == "all" else torch.cat([s + part for s, part in zip(starts, parts)])
    mask = class_mask(classes, labels.shape[0], C)
    if loss_name == "softmax":
        loss = LF.softmax(emb @ weight.t(), labels, negatives_mask=mask)
    else:
        cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
        if loss_name == "d_softmax":
            k = C if classes is None else classes.numel()
            d = REGISTERED_LOSSES.get("d_softmax").presets["end_point"]  # the head's default end point
            loss = LF.d_softmax(cos, labels, 64.0, d, negatives_mask=mask, inter_correction=C / k if corr else 1.0)
        else:
            loss = LF.margin_softmax(cos, labels, 64.0, negatives_mask=mask, **REGISTERED_LOSSES.get(loss_name).margins)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _close(a, b, what, rtol=1e-4, atol=1e-5):
    """fp32 agreement; atol is relative to b's largest entry: logits of size s = 64 carry ~8e-6 absolute
    rounding and 1/|w| makes weight gradients large."""
    atol = atol * max(1.0, b.abs().max().item())
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max abs diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("world_size", sizes(*WORLD_SIZES))
def test_loss_and_gradients_match_single_process_reference(world_size, tmp_root):
    results = run_group(world_size, tmp_root)
    for i, case in enumerate(CASES):
        ref_loss, ref_emb, ref_w = reference(case, world_size)
        what = f"P={world_size} case={case}"
        for rank, res in enumerate(results):
            got = res["parity"][i]
            _close(got["loss"], ref_loss, f"{what} loss on rank {rank}", rtol=1e-5)
            _close(got["grad_emb"], ref_emb[rank * B_LOCAL:(rank + 1) * B_LOCAL], f"{what} grad emb rank {rank}")
            assert got["labels_untouched"], f"{what}: the caller's labels were modified"
            assert got["sparse"] == (case[1] != "all"), f"{what}: weight grad layout"
        grad_w = torch.cat([res["parity"][i]["grad_w"] for res in results])
        _close(grad_w, ref_w, f"{what} grad weight")
        assert ref_w.abs().sum() > 0 and ref_emb.abs().sum() > 0


@pytest.mark.parametrize("world_size", sizes(*WORLD_SIZES))
def test_chunked_and_unchunked_paths_agree(world_size, tmp_root):
    results = run_group(world_size, tmp_root)
    index = {case: i for i, case in enumerate(CASES)}
    for (loss, neg, chunk, corr), i in index.items():
        if chunk != 4 or corr:
            continue
        j = index[(loss, neg, 0, corr)]
        for rank, res in enumerate(results):
            a, b = res["parity"][i], res["parity"][j]
            for key in ("loss", "grad_emb", "grad_w"):
                _close(a[key], b[key], f"P={world_size} {loss}/{neg} rank {rank} {key} chunk 4 vs unchunked",
                       rtol=1e-5, atol=FP32_PATHS_ATOL)


@pytest.mark.parametrize("world_size", sizes(2, 3))
def test_diagnostics_are_global_and_equal_on_every_rank(world_size, tmp_root):
    results = run_group(world_size, tmp_root)
    for i, case in enumerate(CASES):
        diags = [res["parity"][i]["diag"] for res in results]
        assert all(d == diags[0] for d in diags), f"{case}: diagnostics differ across ranks"
        expected = {"intra", "inter"} if case[0] == "d_softmax" else {"loss"}
        assert expected | {"target_cos", "hardest_neg_cos"} == set(diags[0])


def test_bytes_per_step_do_not_grow_with_classes(tmp_root):
    results = run_group(2, tmp_root)
    for res in results:
        comm = res["comm"]
        for neg in NEGATIVES:
            small, large = comm[(40, neg, "steady")], comm[(400, neg, "steady")]
            assert small["bytes"] > 0, f"{neg}: no bytes counted"
            assert small == large, f"{neg}: bytes moved changed with 10x classes: {small} vs {large}"


def payload(world_size: int, neg: str, first: bool, num_classes: int, rank: int) -> dict[str, int]:
    """The payload formula of docs/head.md: bytes each rank receives per collective, global batch B."""
    b = COMM_BATCH
    if world_size == 1:
        return {}
    out = {"labels": 8 * b, "embeddings": 4 * b * D, "stats_max": 3 * 4 * b, "stats_sum": 4 * b,
           "embeddings_grad": 4 * b * D}
    if neg not in ("all", "nearest"):
        out["inter_correction"] = 8  # one float64: the global number of selected classes
    if neg == "nearest":
        out["nearest"] = 8 * b * NEAREST_PER_CLASS  # the batch classes' table rows of ids, int64
        if first:  # the table's first build: every other shard's (C_p, D) fp32 unit rows
            out["nearest_build"] = 4 * D * (num_classes - shard_range(num_classes, world_size, rank)[1])
    if first:
        out["checks"] = 8 * 8 * world_size  # 8 int64 per rank, on the first forward only
    return out


@pytest.mark.parametrize("world_size", sizes(*COMM_WORLD_SIZES))
def test_each_collective_moves_the_payload_formula_whatever_the_world_size(world_size, tmp_root):
    """Per rank and step the statistics cost two all-reduces of 16 B bytes in all: nothing grows with P."""
    results = run_group(world_size, tmp_root)
    for rank, res in enumerate(results):
        for (num_classes, neg, step), snap in res["comm"].items():
            expected = payload(world_size, neg, step == "first", num_classes, rank)
            what = f"P={world_size} rank {rank} C={num_classes} {neg} {step} step"
            assert snap["by_name"] == expected, f"{what}: {snap['by_name']} != {expected}"
            names = [name for name, _, _ in snap["events"]]
            assert names.count("nearest_build") == (world_size - 1 if "nearest_build" in expected else 0), what
            assert [n for i, n in enumerate(names) if not i or names[i - 1] != n] == [n for n in (
                "checks", "labels", "embeddings", "nearest_build", "nearest", "inter_correction", "stats_max",
                "stats_sum", "embeddings_grad") if n in expected], f"{what}: order {snap['events']}"
            stats = expected and snap["by_name"]["stats_max"] + snap["by_name"]["stats_sum"]
            assert world_size == 1 or stats == 16 * COMM_BATCH, f"{what}: statistics bytes {stats}"


def test_bad_inputs_fail_on_every_rank_naming_rank_and_value(tmp_root):
    results = run_group(2, tmp_root)
    for res in results:
        high, low, uneven, tiny = res["bad_inputs"]
        assert high is not None and "labels on rank 1 contain 40" in high, high
        assert low is not None and "labels on rank 1 contain -5" in low, low
        assert uneven is not None and "local batch size 6 on rank 1 differs from 5 on rank 0" in uneven, uneven
        assert tiny is not None and "world size 2 is larger than num_classes=1" in tiny, tiny


@pytest.mark.parametrize("world_size", sizes(1, 3))
@pytest.mark.parametrize("name", tuple(RESHARD))
def test_checkpoint_from_two_ranks_resumes_on_other_world_sizes(world_size, name, tmp_root):
    never_stopped = run_group(2, tmp_root)
    resumed = run_group(world_size, tmp_root)
    want_w = torch.cat([r["reshard"][name]["weight"] for r in never_stopped])
    got_w = torch.cat([r["reshard"][name]["weight"] for r in resumed])
    _close(got_w, want_w, f"{name}: weights after step 4 on P={world_size}", rtol=1e-5, atol=1e-6)
    for r in resumed:
        _close(r["reshard"][name]["loss"], never_stopped[0]["reshard"][name]["loss"], f"{name}: step-4 loss", rtol=1e-6)
    starts = [r["reshard"][name]["start"] for r in resumed]
    assert starts == [shard_range(C, world_size, p)[0] for p in range(world_size)]


@pytest.mark.parametrize("world_size", sizes(1, 2, 3))
def test_step_in_backward_matches_step_after_backward(world_size, tmp_root):
    """Per rank: step in backward == backward + step (losses, shard weights, optimizer state) for every negatives mode;
    and for the world-size independent modes (all, batch) the concatenated shards equal the one-process run."""
    results = run_group(world_size, tmp_root)
    single = run_group(1, tmp_root)[0]["in_backward"]
    for name in IN_BACKWARD_OPT:
        for neg in ("all", "batch", "random"):
            what = f"P={world_size} {name}/{neg}"
            for rank, res in enumerate(results):
                ref, got = res["in_backward"][(name, neg, False)], res["in_backward"][(name, neg, True)]
                _close(got["loss"], ref["loss"], f"{what} rank {rank} losses", rtol=1e-5, atol=1e-6)
                _close(got["weight"], ref["weight"], f"{what} rank {rank} weights", rtol=1e-5, atol=1e-6)
                for key, value in ref["state"].items():
                    _close(got["state"][key].double(), value.double(), f"{what} rank {rank} state {key}", rtol=1e-5,
                           atol=1e-6)
            if neg != "random":  # random negatives depend on the sharding; all and batch do not
                weight = torch.cat([res["in_backward"][(name, neg, True)]["weight"] for res in results])
                _close(weight, single[(name, neg, False)]["weight"], f"{what} vs one process", rtol=1e-5,
                       atol=FP32_PATHS_ATOL)


@pytest.mark.parametrize("world_size", sizes(1, 3))
def test_the_nearest_table_loads_on_other_world_sizes_as_it_was_saved(world_size, tmp_root):
    saved = [r["reshard"]["nearest_table"] for r in run_group(2, tmp_root)]
    loaded = [r["reshard"]["nearest_table"] for r in run_group(world_size, tmp_root)]
    for key in ("ids", "cos"):
        assert torch.equal(torch.cat([t[key] for t in loaded]), torch.cat([t[key] for t in saved])), key
    assert {(t["built_at"], t["every"]) for t in loaded + saved} == {(2, 2)}
