"""Compile the triton backend's kernels for a GPU architecture WITHOUT a GPU and report their resources.

    python -m dsoft_dist.kernels.compile_check                 # sm_90 (H100/H200), D=512, bf16, default tiles
    python -m dsoft_dist.kernels.compile_check --arch 80 --sweep

Uses Triton's bundled ptxas/cuobjdump: no CUDA device or driver needed. Arguments are specialized
as a real launch on contiguous tensors would be (unit strides become constants, pointers and
D-multiples are 16-divisible), so the code is the one the GPU would run. Per kernel it reports
shared memory, registers, stack bytes (register spills), and whether tensor-core MMA is used.
It proves the GPU path compiles and fits; only a GPU can time it (launch/gpu_check.sh).
Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from dsoft_dist.kernels.config import SWEEP_CONFIGS, KernelConfig, default_config, next_pow2

_PTR_TYPES = dict(cols_ptr="*i64", neg_ptr="*i8", tgt_ptr="*i64", valid_ptr="*i1")
_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _kernels():
    from dsoft_dist.kernels.shard_stats_bwd import grad_features_kernel, grad_weight_kernel
    from dsoft_dist.kernels.shard_stats_fwd import row_norms_kernel, shard_stats_fwd_kernel
    return dict(row_norms=row_norms_kernel, forward=shard_stats_fwd_kernel, grad_features=grad_features_kernel,
                grad_weight=grad_weight_kernel)


def _source(fn, dtype: str, out_dtype: str, constexprs: dict):
    """An ASTSource with a launch-like specialization of ``fn``'s arguments."""
    from triton.compiler import ASTSource
    consts = dict(constexprs)
    for name in ("stride_fd", "stride_wd", "stride_od"):
        if name in fn.arg_names:
            consts[name] = 1  # contiguous rows: Triton specializes an int argument equal to 1
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = {"f_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{out_dtype}"}.get(
                name, _PTR_TYPES.get(name, "*fp32"))
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
        if name.endswith("_ptr") or name in ("D", "stride_fb", "stride_wc", "stride_oc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _resources(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
    try:
        text = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(fh.name)
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", text)}
    return dict(registers=found.get("REG"), stack_bytes=found.get("STACK"))


def compile_all(cfg: KernelConfig, dim: int = 512, dtype: str = "bf16", arch: int = 90,
                gather: bool = True, normalize: bool = True) -> list[dict]:
    """Compiles the four kernels for ``cuda:sm_{arch}``; one dict of resources per kernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    compute = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    common = dict(GATHER=gather, HAS_NEG=gather, NORMALIZE=normalize, COMPUTE=compute, DOT_FP32=False,
                  PRECISION="tf32" if dtype != "fp32" else "ieee")
    block_d = cfg.block_d or next_pow2(dim)
    plans = dict(
        row_norms=(dict(GATHER=gather, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), "fp32"),
        forward=(dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), "fp32"),
        grad_features=(dict(common, BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_K=cfg.block_k,
                            BLOCK_D=block_d), "fp32"),
        grad_weight=(dict(common, BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_K=cfg.block_k,
                          BLOCK_D=block_d), dtype),
    )
    rows = []
    for name, fn in _kernels().items():
        consts, out_dtype = plans[name]
        row = dict(kernel=name, arch=arch, dtype=dtype)
        try:
            compiled = triton.compile(_source(fn, dtype, out_dtype, consts), target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        except Exception as exc:  # reported per kernel: the caller decides what is fatal
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
        rows.append({**row, "shared_bytes": compiled.metadata.shared, "mma": mma, **_resources(compiled.asm["cubin"])})
    return rows


def problems(rows: list[dict], tensor_core_kernels=("forward", "grad_features", "grad_weight")):
    """(fatal, warnings): compile errors, shared memory over the limit, no tensor-core MMA; register spills."""
    fatal, warnings = [], []
    for r in rows:
        where = f"{r['kernel']} (sm_{r['arch']}, {r['dtype']})"
        if "error" in r:
            fatal.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared_bytes"] > _SMEM_LIMIT.get(r["arch"], 99 * 1024):
            fatal.append(f"{where}: {r['shared_bytes']} bytes of shared memory exceed the architecture's limit")
        if r["kernel"] in tensor_core_kernels and r["mma"] == "none" and r["dtype"] != "fp32":  # fp32: IEEE FMA
            fatal.append(f"{where}: no tensor-core MMA instruction")
        if r.get("stack_bytes"):
            warnings.append(f"{where}: {r['stack_bytes']} bytes of stack (register spills)")
    return fatal, warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsoft_dist.kernels.compile_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--sweep", action="store_true", help="also the benchmark's sweep configs")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.stderr.write("compile_check needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)\n")
        return 2
    configs = [("default", default_config(args.dim, interpret=False))]
    if args.sweep:
        configs += [(f"sweep{i}", KernelConfig(**c)) for i, c in enumerate(SWEEP_CONFIGS)]
    fatal_default, lines = [], []
    for label, cfg in configs:
        rows = compile_all(cfg, args.dim, args.dtype, args.arch)
        for r in rows:
            sys.stdout.write(f"{label:<8} {r['kernel']:<14} " + (f"ERROR {r['error']}" if "error" in r else
                             f"smem={r['shared_bytes']:>6} regs={r['registers']} stack={r['stack_bytes']} "
                             f"mma={r['mma']}") + "\n")
        fatal, warnings = problems(rows)
        lines += [f"FATAL {label}: {m}" for m in fatal] + [f"WARNING {label}: {m}" for m in warnings]
        fatal_default += fatal if label == "default" else []
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 1 if fatal_default else 0


if __name__ == "__main__":
    raise SystemExit(main())
