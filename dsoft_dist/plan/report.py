"""One plan as a dict (what ``dsoft plan --json`` prints) and as text (what ``dsoft plan`` prints).

    result = build_plan(inp, backbone=(43_590_848, 38_223), profile=prof)
    print(format_details(result)); print(format_table([result, ...]))
"""
from __future__ import annotations

from dataclasses import asdict

from dsoft_dist.config.schema import rate_text
from dsoft_dist.plan.estimate import (
    PlanInputs,
    collectives,
    head_flops,
    link_bytes,
    nearest_build,
    nearest_pairs,
    nearest_width,
    rows_per_step,
    shard_rows,
    state_bytes,
)
from dsoft_dist.plan.memory import backbone_bytes, transient_bytes
from dsoft_dist.plan.timing import predict_time

GIB, MIB = 1 << 30, 1 << 20
NO_PROFILE = ("time: not predicted (no measured profile of the device). Measure one on the target machine: "
              "dsoft plan <same sizes> --device {device} --measure-profile FILE (on a GPU: launch/gpu_check.sh OUT "
              "writes OUT/plan-profile.json), then plan with --profile FILE")
ASSUMPTIONS = [
    "memory per GPU = head weights + optimizer state + the head step's transient (torch chunked path) + the "
    "backbone's params, grads, DDP buckets and optimizer state; backbone activations, the CUDA context and "
    "allocator fragmentation are NOT included",
    "the largest class shard (ceil(C / P) rows); K for partial/batch negatives is an upper bound (all labels distinct)",
    "communication = the head's collectives in a steady step (the input check runs only on the first step); "
    "ring algorithm, ranks placed node-contiguously, every ring link carries the same bytes",
    "FLOPs: model 6 B K D, executed 8 B K D per rank (backward recomputes the logits; no logit cache)",
    "negatives=nearest: K random rows plus n (row, nearest class) pairs per rank, n = B M C_local / C expected "
    "(exact at one rank; at most B M), used for the transient, FLOPs (+ 6 n D) and time; its table build (at the "
    "first step, then every `every` draws) is reported apart, not in the step's figures",
    "time: only from a measured profile: fixed per-step work + GEMM + exp2 passes + row passes + ring collectives, "
    "no overlap",
]


def build_plan(inp: PlanInputs, backbone: tuple[int, int] | None = None, profile: dict | None = None,
               intra_gbps: float | None = None, inter_gbps: float | None = None) -> dict:
    """Everything ``dsoft plan`` reports for one configuration, as plain JSON-ready values (bytes, FLOP, s)."""
    state, transient = state_bytes(inp), transient_bytes(inp)
    bb = backbone_bytes(inp, *backbone) if backbone is not None else None
    total = state["total"] + transient["peak"] + (bb["total"] if bb else 0)
    capacity = int(inp.gpu_memory_gib * GIB)
    warnings = []
    if total > capacity:
        warnings.append(f"does not fit: {total / GIB:.1f} GiB per GPU needed (head {state['total'] / GIB:.1f} + "
                        f"transient {transient['peak'] / GIB:.1f}" + (f" + backbone {bb['total'] / GIB:.1f}" if bb
                                                                       else "") +
                        f") > --gpu-memory {inp.gpu_memory_gib:g} GiB, before activations; use more GPUs, a lower "
                        f"--sample-rate or --step-in-backward")
    time = predict_time(inp, profile, intra_gbps, inter_gbps) if profile is not None else None
    nearest = None
    if inp.negatives == "nearest":
        nearest = {"per_class": nearest_width(inp), **nearest_pairs(inp), "build": nearest_build(inp)}
    return {"inputs": asdict(inp), "global_batch": inp.global_batch, "shard_rows": shard_rows(inp),
            "rows_per_step": rows_per_step(inp), "nearest": nearest,
            "memory": {"head": state, "transient": transient, "backbone": bb,
                                                            "total": total, "capacity": capacity,
                                                            "fits": total <= capacity},
            "collectives": collectives(inp), "links": link_bytes(inp), "flops": head_flops(inp),
            "time": time, "time_note": None if time else NO_PROFILE.format(device=inp.device), "warnings": warnings}


def _header(res: dict) -> str:
    i = res["inputs"]
    opt = f"{i['optimizer']} ({'momentum ' + format(i['momentum'], 'g') + ', ' if i['optimizer'] == 'sgd' else ''}" \
          f"{i['head_mode']}{', in backward' if i['step_in_backward'] else ''})"
    return (f"C={i['classes']:,} classes on P={i['gpus']} ({i['nodes']} node{'s' if i['nodes'] > 1 else ''} x "
            f"{i['gpus'] // i['nodes']}), D={i['dim']}, B={i['batch_per_gpu']}/GPU (global {res['global_batch']:,}), "
            f"embeddings {i['dtype']}, weights {i['weight_dtype']}, {opt}, negatives {i['negatives']}"
            f"{' (M=' + str(res['nearest']['per_class']) + ')' if res['nearest'] else ''} "
            f"r={rate_text(i['sample_rate'])}, device {i['device']}")


def _memory_lines(res: dict) -> list[str]:
    m, i = res["memory"], res["inputs"]
    t = m["transient"]
    lines = ["memory per GPU (MiB):",
             f"  head weights          {m['head']['weights'] / MIB:12.1f}   C_local D x {i['weight_dtype']}",
             f"  optimizer state       {m['head']['optimizer'] / MIB:12.1f}",
             *([f"  nearest table         {m['head']['nearest'] / MIB:12.1f}   C_local M x (int64 id + fp32 cosine)"]
               if res["nearest"] else []),
             f"  transient workspace   {t['peak'] / MIB:12.1f}   peak in {t['peak_phase']}, chunk {t['chunk']:,} rows"]
    if m["backbone"]:
        b = m["backbone"]
        lines.append(f"  backbone {i['backbone']:<12} {b['total'] / MIB:12.1f}   {b['parameters'] / 1e6:.1f}M params: "
                     f"params {b['params'] / MIB:.0f} + grads {b['grads'] / MIB:.0f} + DDP buckets "
                     f"{b['ddp_buckets'] / MIB:.0f} + optimizer {b['optimizer'] / MIB:.0f} (activations not included)")
    lines.append(f"  total                 {m['total'] / MIB:12.1f}   = {m['total'] / GIB:.2f} GiB of "
                 f"{m['capacity'] / GIB:g} GiB: {'fits' if m['fits'] else 'DOES NOT FIT'}")
    return lines


def _comm_lines(res: dict) -> list[str]:
    links, i = res["links"], res["inputs"]
    if not res["collectives"]:
        return ["communication: none (one rank)"]
    lines = ["communication per rank and step (bytes; counted = received, as the head's CommCounter counts; "
             "per link = what a ring sends over each link):",
             f"  {'collective':<16} {'op':<15} {'counted':>13} {'per link':>13}"]
    for c in res["collectives"]:
        lines.append(f"  {c['name']:<16} {c['op']:<15} {c['bytes']:>13,} {c['link']:>13,.0f}")
    lines.append(f"  {'total':<32} {links['counted']:>13,} {links['per_link']:>13,.0f}")
    inter = (f"{links['inter_links']} inter-node links (one per node) each carry {links['inter_per_link']:,.0f} "
             f"bytes per step" if links["inter_links"] else "no inter-node link (one node)")
    lines.append(f"  ring over {i['gpus']} ranks: {links['intra_links']} intra-node links, {inter}")
    return lines


def _time_lines(res: dict) -> list[str]:
    t = res["time"]
    if t is None:
        return [res["time_note"]]
    comm = f"{t['comm_s'] * 1e3:.2f} ms ({t['comm_timed_by']})" if t["comm_s"] is not None \
        else f"not predicted: {t['comm_timed_by']}"
    total = f"{t['total_s'] * 1e3:.1f} ms" if t["total_s"] is not None else f"{t['compute_s'] * 1e3:.1f} ms + comm"
    g = t["gemm_point"]
    pairs = f" + nearest pairs {t['nearest_s'] * 1e3:.1f} ms" if t["nearest_s"] else ""
    return [f"predicted head step: {total} = GEMM {t['gemm_s'] * 1e3:.1f} ms ({g['gflops']:.0f} GFLOP/s measured "
            f"at B={g['batch']}, D={g['dim']}, w={g['k']}" + (f", / {t['ranks_sharing_device']} ranks sharing the "
                                                              f"device" if t["ranks_sharing_device"] > 1 else "") +
            f") + exp2 passes {t['elementwise_s'] * 1e3:.1f} ms + row passes {t['rows_s'] * 1e3:.1f} ms{pairs} + "
            f"fixed per-step work {t['fixed_s'] * 1e3:.1f} ms + communication {comm}"]


def _nearest_lines(res: dict) -> list[str]:
    """negatives=nearest: the pairs per rank (expected and bound) and what one table build costs."""
    n = res["nearest"]
    if n is None:
        return []
    b = n["build"]
    return [f"nearest pairs: n = {n['expected']:,} (row, nearest class) pairs per rank and step besides the K rows "
            f"(expected, B M C_local / C; exact at one rank; at most B M = {n['bound']:,})",
            f"nearest table build (first step, then every {b['every']:,} draws (automatic); not in the step's "
            f"figures): {b['flops'] / 1e9:,.1f} GFLOP, {b['bytes']:,} bytes received (broadcasts), "
            f"{b['transient'] / MIB:,.1f} MiB transient"]


def format_details(res: dict) -> str:
    """The full text report of one configuration."""
    f = res["flops"]
    pairs = " + 6 n D" if res["nearest"] else ""
    lines = [_header(res),
             f"class shard: C_local = {res['shard_rows']:,} rows (largest), K = {res['rows_per_step']:,} rows "
             f"computed per rank and step", *_nearest_lines(res), *_memory_lines(res), *_comm_lines(res),
             f"head FLOPs per rank and step: model 6 B K D{pairs} = {f['model'] / 1e9:,.1f} GFLOP, executed "
             f"8 B K D{pairs} = {f['executed'] / 1e9:,.1f} GFLOP (x {res['inputs']['gpus']} ranks for the cluster)",
             *_time_lines(res)]
    lines += [f"WARNING: {w}" for w in res["warnings"]]
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    """One line per configuration (several --classes / --gpus / --sample-rate values)."""
    head = (f"{'classes':>11} {'GPUs':>5} {'nodes':>5} {'r':>6} {'K/rank':>9} {'state MiB':>10} {'trans MiB':>10} "
            f"{'backbone':>9} {'total GiB':>9} {'fits':>4} {'bytes/step':>11} {'inter B/link':>12} "
            f"{'model GF':>9} {'compute ms':>10} {'step ms':>8}")
    lines = [head]
    for r in results:
        i, m, t = r["inputs"], r["memory"], r["time"]
        step = "-" if t is None or t["total_s"] is None else f"{t['total_s'] * 1e3:.1f}"
        compute = "-" if t is None else f"{t['compute_s'] * 1e3:.1f}"
        lines.append(f"{i['classes']:>11,} {i['gpus']:>5} {i['nodes']:>5} {rate_text(i['sample_rate']):>6} "
                     f"{r['rows_per_step']:>9,} {m['head']['total'] / MIB:>10.0f} {m['transient']['peak'] / MIB:>10.0f} "
                     f"{(m['backbone']['total'] / MIB if m['backbone'] else 0):>9.0f} {m['total'] / GIB:>9.2f} "
                     f"{'yes' if m['fits'] else 'NO':>4} {r['links']['counted']:>11,} "
                     f"{r['links']['inter_per_link']:>12,.0f} {r['flops']['model'] / 1e9:>9.1f} {compute:>10} {step:>8}")
    notes = sorted({r["time_note"] for r in results if r["time_note"]})
    notes += sorted({f"communication time not predicted: {r['time']['comm_timed_by']}" for r in results
                     if r["time"] is not None and r["time"]["comm_s"] is None})
    return "\n".join(lines + notes + [f"WARNING ({r['inputs']['classes']:,} classes, {r['inputs']['gpus']} GPUs, "
                                      f"r={rate_text(r['inputs']['sample_rate'])}): {w}"
                                      for r in results for w in r["warnings"]])
