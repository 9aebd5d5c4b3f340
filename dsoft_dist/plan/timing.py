"""Predicted head step time from a measured device profile (``dsoft_dist.plan.profile``), never from guesses.

    t = t_fixed + t_gemm + t_elementwise + t_rows + t_nearest + t_comm        (no overlap assumed)

    t_fixed       = S - (the three terms below at K = 256)   S: the profile's measured head step at the
                                     plan's (B, D) with 256 rows (dense or sampled path): per-row work over
                                     B, launches, Python; clamped at 0

    t_gemm        = 8 B K D / R      R: the profile's GEMM GFLOP/s at the nearest measured (B, D, w) shape,
                                     the head's class-major layout (``dsoft_dist.bench.head.matmul_rate``)
    t_elementwise = n B K / E        E: elements/s of one fp32 exp2 pass over a (w, B) block; n = 2 passes
                                     with the CPU epilogues (cpu-c: one compiled pass each way), 8 with torch
                                     ops (forward: 1/|w|, max, shift, exp, sum; backward: scale-shift,
                                     exp, 1/|w|; the radial sum is a pass over the chunk's (w, D) gradient)
    t_rows        = dense: c C_local D 4 / M     M: copy bandwidth; c = 6 streamed row passes (weight,
                                     momentum, gradient read + written), 10 for AdamW
                    row list: g (K + B) D 4 / G  G: the profile's random-row gather bandwidth from a table
                                     of the shard's size; g = 7 row gathers/scatters (rows in forward and
                                     backward, the optimizer's take and put of weight and momentum, the
                                     gradient's coalesce), 11 for AdamW; nearest: K + B + n rows (its n
                                     pairs' rows are stepped too)
    t_nearest     = 18 n D / E       nearest only, n its pairs per rank (expected): the (n, D) passes of the
                                     pairs at the exp2 pass rate E (forward 6: the rows' gather, norm and
                                     division, the features' gather, product, sum; backward 12: the
                                     product's two gradients, the features' scatter, the normalization's
                                     backward); the per-row work over (B, M) is not modelled
    t_comm        = sum over the step's collectives of s alpha + link / W   (ring: s = P - 1 steps for
                                     all_gather / reduce_scatter, 2 (P - 1) for all_reduce)

On a CPU profile the ranks of a node share its cores: R and E are divided by the ranks per node,
t_fixed (mostly single-threaded) is multiplied by max(1, ranks per node / cores).
alpha, W: the profile's gloo figures between 2 local processes (CPU profiles, one node), or the
declared --intra-gbps / --inter-gbps (the ring runs at its slowest link; declared links have no
latency term). Without a figure for a link, the communication time is not predicted.
"""
from __future__ import annotations

import math

from dsoft_dist.plan.estimate import PlanInputs, collectives, nearest_pairs, rows_per_step, shard_rows
from dsoft_dist.plan.memory import chunk_width, touched_rows

ELEMENTWISE_PASSES = {"cpu-c": 2, "torch": 8}  # over a (k, B) chunk: the compiled passes / torch ops (5 + 3)
ROW_PASSES = {"sgd": 6, "adamw": 10}  # streamed passes over C_local D (dense gradient)
ROW_GATHERS = {"sgd": 7, "adamw": 11}  # random-row gathers / scatters of K + B rows (row lists)
NEAREST_PASSES = 18  # passes over the (n, D) pairs of negatives=nearest, forward and backward


def _nearest(points: list[dict], key) -> dict:
    """The measured point closest to the wanted shape in log space (key(point) -> distance)."""
    if not points:
        raise ValueError("the profile has no measurements of this kind; measure one with --measure-profile FILE")
    return min(points, key=key)


def gemm_rate(profile: dict, batch: int, dim: int, width: int) -> dict:
    """The profile's GEMM point nearest to (B, D, w): {'batch', 'dim', 'k', 'gflops'}."""
    def distance(p):
        return abs(math.log(p["batch"] / batch)) + abs(math.log(p["dim"] / dim)) + abs(math.log(p["k"] / width))
    return _nearest(profile.get("gemm", []), distance)


def elementwise_rate(profile: dict, elements: int) -> dict:
    """The profile's exp2-pass point nearest to ``elements`` per block: {'elements', 'per_s'}."""
    return _nearest(profile.get("elementwise", []), lambda p: abs(math.log(p["elements"] / max(elements, 1))))


def _link(inp: PlanInputs, profile: dict, op: str, intra_gbps, inter_gbps):
    """(alpha seconds per ring step, W bytes/s) for ``op``, or (None, what is missing)."""
    measured = (profile.get("collective") or {}).get(op) if profile.get("device") == "cpu" else None
    if intra_gbps is not None:
        alpha, intra = 0.0, intra_gbps * 1e9
    elif measured is not None:
        alpha, intra = measured["latency_s"], measured["gbps"] * 1e9
    elif profile.get("device") == "cpu":
        return None, "measure the profile with its collective (2 gloo ranks) or declare --intra-gbps"
    else:
        return None, "declare --intra-gbps for the GPUs' link (a GPU profile has no GPU-to-GPU figure)"
    if inp.nodes == 1:
        return alpha, intra
    if inter_gbps is None:
        return None, "declare --inter-gbps for the link between nodes"
    return alpha, min(intra, inter_gbps * 1e9)


def comm_time(inp: PlanInputs, profile: dict, intra_gbps=None, inter_gbps=None) -> tuple[float | None, str]:
    """(seconds per step for the head's collectives, how they were timed) or (None, what is missing)."""
    total, how = 0.0, "none (one rank)"
    for c in collectives(inp):
        alpha, bandwidth = _link(inp, profile, c["op"], intra_gbps, inter_gbps)
        if alpha is None:
            return None, bandwidth
        steps = (2 if c["op"] == "all_reduce" else 1) * (inp.gpus - 1)
        total += steps * alpha + c["link"] / bandwidth
        how = "gloo between 2 local processes, from the profile" if intra_gbps is None else "declared link bandwidth"
    return total, how


def _work_terms(inp: PlanInputs, profile: dict, k: int, width: int, touched: int, share: int, pairs: int = 0) -> dict:
    """(t_gemm, t_elementwise, t_rows, t_nearest) seconds for K = k rows in chunks of ``width``, ``touched`` rows
    stepped, ``pairs`` nearest pairs."""
    b, d = inp.global_batch, inp.dim
    gemm = gemm_rate(profile, b, d, width)
    elem = elementwise_rate(profile, width * b)
    pairs_rate = elementwise_rate(profile, pairs * d)["per_s"] if pairs else 1.0
    return {"gemm_s": 8 * b * k * d / (gemm["gflops"] * 1e9 / share),
            "elementwise_s": ELEMENTWISE_PASSES[inp.backend] * b * k / (elem["per_s"] / share),
            "rows_s": _rows_time(inp, profile, touched),
            "nearest_s": NEAREST_PASSES * pairs * d / (pairs_rate / share),
            "gemm_point": gemm, "elementwise_point": elem}


def _rows_time(inp: PlanInputs, profile: dict, touched: int) -> float:
    """t_rows for ``touched`` rows: streamed passes (dense gradient) or random-row gathers (row lists)."""
    nbytes = touched * inp.dim * 4
    if not inp.sampled:
        return ROW_PASSES[inp.optimizer] * nbytes / (profile["memory"]["gbps"] * 1e9)
    points = profile.get("gather") or []
    if not points:  # an older profile without the gather figure: streamed bandwidth
        return ROW_GATHERS[inp.optimizer] * nbytes / (profile["memory"]["gbps"] * 1e9)
    c_local = shard_rows(inp)
    point = _nearest(points, lambda p: abs(math.log(p["dim"] / inp.dim)) + abs(math.log(p["rows"] / c_local)))
    return ROW_GATHERS[inp.optimizer] * nbytes / (point["gbps"] * 1e9)


def fixed_time(inp: PlanInputs, profile: dict, share: int) -> float:
    """t_fixed: the profile's measured 256-row head step at the nearest (B, D) (same path: dense or sampled)
    minus its modelled K-proportional work, times max(1, ranks per node / cores) on CPU; 0 without one."""
    points = [p for p in profile.get("step", []) if p["sampled"] == inp.sampled]
    if not points:
        return 0.0
    point = _nearest(points, lambda p: abs(math.log(p["batch"] / inp.global_batch)) + abs(math.log(p["dim"] / inp.dim)))
    small = _work_terms(inp, profile, 256, 256, 256 + (inp.global_batch if inp.sampled else 0), 1)
    rest = point["seconds"] - small["gemm_s"] - small["elementwise_s"] - small["rows_s"]
    crowd = max(1.0, share / (profile.get("cpu_count") or 1)) if inp.device == "cpu" else 1.0
    return max(0.0, rest) * crowd


def predict_time(inp: PlanInputs, profile: dict, intra_gbps=None, inter_gbps=None) -> dict:
    """The step time model above for one configuration: seconds per part and the measured points used."""
    if profile.get("device") != inp.device:
        raise ValueError(f"the profile was measured on {profile.get('device')!r} but --device is {inp.device!r}: "
                         f"plan with --device {profile.get('device')} or measure a profile on {inp.device}")
    share = inp.gpus_per_node if inp.device == "cpu" else 1
    work = _work_terms(inp, profile, rows_per_step(inp), chunk_width(inp), touched_rows(inp), share,
                       nearest_pairs(inp)["expected"])
    t_fixed = fixed_time(inp, profile, share)
    t_comm, comm_how = comm_time(inp, profile, intra_gbps, inter_gbps)
    compute = t_fixed + work["gemm_s"] + work["elementwise_s"] + work["rows_s"] + work["nearest_s"]
    return {**work, "fixed_s": t_fixed, "comm_s": t_comm, "compute_s": compute,
            "total_s": None if t_comm is None else compute + t_comm, "comm_timed_by": comm_how,
            "ranks_sharing_device": share}
