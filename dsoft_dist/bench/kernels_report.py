"""Writes the GPU check's report.md from the files launch/gpu_check.sh leaves in its output folder.

    python -m dsoft_dist.bench.kernels_report OUT_DIR > OUT_DIR/report.md

Reads versions.txt, nvidia-smi.txt, stages.txt, pytest-*.xml (JUnit), kernels.json, head.log and
plan.log (``dsoft plan`` with the profile it measured, plan-profile.json), and
states each target of the kernels issue as met / not met with the measured figure:
triton full-head step >= 1.3x faster than the torch chunked path, >= 60% of the measured bf16
matmul rate for the GEMM part, and transient memory far below one (B, K) logit matrix.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

SPEEDUP_TARGET, GEMM_EFF_TARGET = 1.3, 0.60


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return f"(missing: {os.path.basename(path)})"


def junit_summary(path: str) -> str:
    """'N passed, F failed, E errors, S skipped' plus the failing test ids, from a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return f"(no results: {os.path.basename(path)} missing or unreadable; see its .log)"
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    lines = [f"{len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed/errors, {len(skipped)} skipped"]
    lines += [f"- FAILED {c.get('classname')}::{c.get('name')}" for c in failed]
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """One line per (B, C_local) full-head size: speedup, GEMM efficiency and memory vs the targets."""
    lines, by = [], {}
    for r in result.get("cases", []):
        if r.get("rate", 0) >= 1.0 and "seconds" in r:
            by.setdefault((r["batch"], r["classes"]), {})[r["method"]] = r
    for (batch, classes), m in sorted(by.items()):
        if "triton" not in m:
            lines.append(f"- B={batch} C_local={classes}: no triton figure")
            continue
        row = m["triton"]
        logit_mib = batch * classes * 2 / 2**20
        parts = [f"B={batch} C_local={classes}:"]
        if "torch" in m:
            sp = m["torch"]["seconds"] / row["seconds"]
            parts.append(f"speedup vs torch {sp:.2f}x ({'met' if sp >= SPEEDUP_TARGET else 'NOT met'}, "
                         f"target {SPEEDUP_TARGET}x);")
        eff = row["gemm_eff"]
        parts.append(f"GEMM part {eff:.0%} of torch.mm bf16 rate ({'met' if eff >= GEMM_EFF_TARGET else 'NOT met'}, "
                     f"target {GEMM_EFF_TARGET:.0%}; model-FLOP eff {row['model_eff']:.0%});")
        if row.get("peak_mib") is not None:
            parts.append(f"transient {row['peak_mib']:.0f} MiB vs one bf16 logit matrix {logit_mib:.0f} MiB")
        lines.append("- " + " ".join(parts))
    return lines or ["- no benchmark results"]


def report(out_dir: str) -> str:
    """The markdown report for one gpu_check output folder."""
    try:
        with open(os.path.join(out_dir, "kernels.json")) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = {}
    sweep = "\n".join(f"- config {r.get('config_index')}: {r.get('config')} -> "
                      + (f"{r['seconds']:.4f} s" if "seconds" in r else f"error {r.get('error')}")
                      for r in result.get("sweep", [])) or "- (none)"
    return "\n\n".join([
        "# GPU check: the triton backend's head kernels",
        "## Machine and versions\n```\n" + _read(os.path.join(out_dir, "versions.txt")) + "\n```",
        "## Stages (rc 0 = ok, 124/137 = timed out)\n```\n" + _read(os.path.join(out_dir, "stages.txt")) + "\n```",
        "## GPU tests\n" + junit_summary(os.path.join(out_dir, "pytest-gpu.xml")),
        "## CPU suite's odd shapes on compiled kernels (interpreted when no GPU)\n"
        + junit_summary(os.path.join(out_dir, "pytest-compiled.xml")),
        "## Compiled kernel resources (sm_90 code)\n```\n"
        + _read(os.path.join(out_dir, "compile-check.log")) + "\n```",
        "## Targets (full D-Softmax head step)\n" + "\n".join(targets(result)),
        "## Tile sweep (fixed configs, first size)\n" + sweep + f"\n\nused: {result.get('config')}",
        "## Benchmark table\n```\n" + result.get("table", "(no table: see bench.log)") + "\n```",
        "## Matmul reference rates (TFLOP/s, torch.mm, same run)\n```\n"
        + json.dumps(result.get("matmul", {}), indent=1) + "\n```",
        "## Whole head step, torch chunked path, fp32 (dsoft_dist.bench.head)\n```\n"
        + _read(os.path.join(out_dir, "head.log")) + "\n```",
        "## Backbone training step, ViT-B, bf16, activation checkpointing off and on (dsoft bench backbone)\n```\n"
        + _read(os.path.join(out_dir, "backbone.log")) + "\n```",
        "## dsoft plan with this GPU's profile (plan-profile.json; docs/scale.md)\n```\n"
        + _read(os.path.join(out_dir, "plan.log")) + "\n```",
        "## nvidia-smi\n```\n" + _read(os.path.join(out_dir, "nvidia-smi.txt")) + "\n```",
    ]) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.stderr.write("usage: python -m dsoft_dist.bench.kernels_report OUT_DIR (the gpu_check folder)\n")
        return 2
    sys.stdout.write(report(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
