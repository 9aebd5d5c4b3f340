"""The cpu-c backend's compiled passes between the torch chunked path's GEMMs: ``cpu_epilogue.c``, built on first use.

    from dsoft_dist.kernels.cpu import cpu_epilogues
    epi = cpu_epilogues()          # None when disabled or no C compiler works here
    if epi is not None:
        epi.forward_fixed(logits, inv, neg_shift, slots, j, run_max, run_sum)

On CPU the chunked head step spends ~5% of its time in elementwise passes between the
GEMMs, each of which re-reads a (k, B) block after the GEMM has pushed it out of L2; the
C functions do each chunk's passes in one. They are compiled with the system C compiler
(``$CC``, else gcc, else cc; -O3 -march=native -fopenmp) into ``$DSOFT_CACHE_DIR`` (default
``~/.cache/dsoft_dist``), keyed by the source, the command, the compiler and the CPU, and
loaded with ctypes; OpenMP threads come from torch's runtime (torch.set_num_threads applies).
Without a working compiler, or with ``DSOFT_CPU_KERNELS=0``, ``cpu_epilogues()`` returns
None (logged once) and the head runs its torch ops, the reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

from dsoft_dist.observability import get_logger

log = get_logger(__name__)

ENV_VAR = "DSOFT_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu_epilogue.c")
# -march=native alone: forcing 512-bit vectors (-mprefer-vector-width=512, x86 only) measured no faster here
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_SIGNATURES = {
    "dsoft_forward_fixed": [_P, _P, _P, _P, _P, _I32, _P, _P, _I64, _I64],
    "dsoft_backward_block": [_P, _P, _P, _P, _P, _P, _I32, _P, _P, _P, _I64, _I64],
    "dsoft_sgd_tail": [_P, _P, _P, _F, _I64, _I64],
}
_loaded: dict[str, "CpuEpilogues | None"] = {}


def _ptr(t: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> int:
    """The tensor's data address, after checking it is what the C code indexes: ``numel`` contiguous
    elements of ``dtype`` on CPU (a wrong size would read or write past the tensor)."""
    if not t.is_contiguous() or t.device.type != "cpu" or t.dtype != dtype or t.numel() != numel:
        raise ValueError(f"the CPU epilogues take contiguous {dtype} CPU tensors of {numel} elements here, got "
                         f"{t.dtype} {tuple(t.shape)} stride {t.stride()} on {t.device}")
    return t.data_ptr()


class CpuEpilogues:
    """The compiled functions, called on contiguous float32 CPU tensors (int32 for the slots).

    slots: (chunk_id (B,) int32, offset (B,) int32): batch row b's target is row offset_b of
    chunk chunk_id_b (chunk_id -1: not in this shard's columns); see dsoft_dist.head.chunks.TargetSlots.
    """

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self._lib = lib

    def forward_fixed(self, logits, inv, neg_shift, slots, chunk, run_max, run_sum):
        """In place on run_max, run_sum (B,): with x = logits (k, B) * inv (k, 1) + neg_shift (1, B), the
        batch rows' targets in this chunk excluded: run_max = max(run_max, max_k x), run_sum += sum_k 2^x."""
        k, batch = logits.shape
        if self._lib.dsoft_forward_fixed(_ptr(logits, k * batch), _ptr(inv, k), _ptr(neg_shift, batch),
                                         _ptr(slots[0], batch, torch.int32), _ptr(slots[1], batch, torch.int32),
                                         chunk, _ptr(run_max, batch), _ptr(run_sum, batch), k, batch):
            raise MemoryError(f"dsoft_forward_fixed could not allocate its {2 * batch} floats per thread")

    def backward_block(self, logits, inv, inv_sq, neg_shift, slots, chunk, coef, sign_ln2, minus_radial):
        """In place, logits (k, B) (raw-row logits) become the block 2^(logits * inv + neg_shift) * inv, with
        coef * inv at the batch rows' targets; minus_radial (k,) = inv_sq * sum_b sign_ln2_b logits_kb block_kb."""
        k, batch = logits.shape
        self._lib.dsoft_backward_block(_ptr(logits, k * batch), _ptr(inv, k), _ptr(inv_sq, k), _ptr(neg_shift, batch),
                                       _ptr(slots[0], batch, torch.int32), _ptr(slots[1], batch, torch.int32), chunk,
                                       _ptr(coef, batch), _ptr(sign_ln2, batch), _ptr(minus_radial, k), k, batch)

    def sgd_tail(self, w, buf, coef, lr):
        """In place on rows w (k, D) and their momentum buf (k, D): buf += coef (k,)[:, None] * w; w -= lr * buf.

        Both tensors' version counters are bumped like an in-place torch op's, so autograd still
        refuses a backward that saved the old rows."""
        k, dim = w.shape
        self._lib.dsoft_sgd_tail(_ptr(w, k * dim), _ptr(buf, k * dim), _ptr(coef, k), float(lr), k, dim)
        increment_version(w)
        increment_version(buf)


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell would), else gcc, else cc; None if none is found."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = shutil.which("gcc") or shutil.which("cc")
    return [found] if found else None


def _cpu_identity() -> str:
    """The CPU's model and flags: -march=native code must not run on another CPU (a shared cache dir)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("DSOFT_CACHE_DIR") or Path.home() / ".cache" / "dsoft_dist")


def _build(cc: list[str]) -> Path:
    """Compiles the source unless a build with the same key exists; returns the .so path (atomic rename)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True).stdout
    source, flags = _SOURCE.read_bytes(), _FLAGS
    key = hashlib.sha256(source + " ".join([*cc, *flags]).encode() + version.encode() + _cpu_identity().encode())
    out_dir = _cache_dir()
    target = out_dir / f"cpu_epilogue-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {proc.stderr.strip()[-500:]}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: others sharing the cache dir could not load it
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def cpu_epilogues() -> CpuEpilogues | None:
    """The compiled epilogues, or None when ``DSOFT_CPU_KERNELS=0`` or they cannot be built (logged once)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    if "lib" in _loaded:
        return _loaded["lib"]
    try:
        cc = _compiler()
    except ValueError as exc:  # $CC that does not split (an unclosed quote)
        log.warning("CC=%r is not a command (%s); the head's CPU path runs its torch ops", os.environ.get("CC"), exc)
        cc = []
    epi = None
    if cc is None:
        log.info("no C compiler found ($CC, gcc, cc): the head's CPU path runs its torch ops (a few % slower)")
    elif cc:
        try:
            path = _build(cc)
            epi = CpuEpilogues(ctypes.CDLL(str(path)), path)
            log.debug("CPU epilogues loaded from %s", path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.warning("could not build the CPU epilogues (%s); the head's CPU path runs its torch ops", exc)
    _loaded["lib"] = epi
    return epi
