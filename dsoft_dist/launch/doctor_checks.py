"""The checks of ``dsoft doctor`` (``dsoft_dist.launch.doctor`` runs them in order and prints the report).

Each check returns one ``Check`` (or a list): ``ok`` | ``warn`` | ``fail``, the check's name, what was found
and the fix for a problem. A check never raises for a problem it finds; that is its FAIL result.

    versions, gpus          check_versions(), check_gpus(backend)
    network                 check_network(interfaces(), backend, nnodes)
    rendezvous, hostname    check_master_addr(site), check_hostname(site), check_port(site)
    data, run-folder        check_data(cfg.data), check_run_folder(cfg)
    ckpt-folder, disk       check_checkpoint_folder(checkpoint_root(cfg), site), check_disk(cfg, root)
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import platform
import socket
import struct
from dataclasses import dataclass
from shutil import disk_usage

import torch

from dsoft_dist.observability import get_logger

log = get_logger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"
MARKER_PREFIX = ".dsoft-doctor-"
FIXED_OVERHEAD_BYTES = 2 ** 20  # trainer.pt, manifest, RNG states: small next to the weights
IFNAME_FIX = "export NCCL_SOCKET_IFNAME=<the interface the nodes share> (GLOO_SOCKET_IFNAME for gloo)"
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass
class Check:
    """One check's result: status ok | warn | fail, its name, what was found, and the fix for a problem."""

    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``ok   name         detail`` (``  fix: ...`` appended for a warn or a FAIL)."""
        label = "FAIL" if self.status == FAIL else self.status
        fix = f"  fix: {self.fix}" if self.fix and self.status != OK else ""
        return f"{label:<4} {self.name:<12} {self.detail}{fix}"


@dataclass
class Site:
    """Where this node stands in the job: node count (and where it came from), rank, rendezvous endpoint."""

    nnodes: int
    nnodes_source: str
    node_rank: int
    master_addr: str
    master_port: int
    hostname: str


# ---------------------------------------------------------------- 1. versions, 2. GPUs


def _nccl_version() -> str:
    if not torch.cuda.is_available():
        return "none"
    try:
        version = torch.cuda.nccl.version()
    except Exception as err:  # a torch built without NCCL
        log.debug("torch.cuda.nccl.version() failed: %s", err)
        return "none"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def check_versions() -> Check:
    """python, torch, CUDA runtime, NCCL, Triton and dsoft_dist; a warn only for Triton missing on a GPU node."""
    import dsoft_dist

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # ImportError, or a broken install
        log.debug("import triton failed: %s", err)
        triton_version = "not installed"
    found = (f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
             f"NCCL {_nccl_version()}, triton {triton_version}, dsoft_dist {dsoft_dist.__version__}")
    if triton_version == "not installed" and torch.cuda.is_available():
        return Check(WARN, "versions", found, "pip install triton (the head's triton backend needs it on GPUs; "
                     "head.backend=torch runs without it, slower)")
    return Check(OK, "versions", found)


def backend_of(backend: str) -> str:
    """The backend a run would use: ``auto`` is nccl with CUDA, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def check_gpus(backend: str) -> Check:
    """The GPUs torch sees; none is fine for gloo, a failure for ``parallel.backend=nccl``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if backend == "nccl":
            return Check(FAIL, "gpus", "no GPU, but parallel.backend=nccl needs CUDA GPUs",
                         "use --set parallel.backend=gloo (or auto), or run on a node where torch sees its GPUs "
                         "(check nvidia-smi, CUDA_VISIBLE_DEVICES and that torch is a CUDA build)")
        return Check(OK, "gpus", "no GPU: the gloo backend will be used")
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    return Check(OK, "gpus", f"{count} GPU(s): {', '.join(names)}; backend {backend_of(backend)}")


# ---------------------------------------------------------------- 3. network interfaces


def _ipv4_of(name: str) -> str | None:
    try:
        import fcntl

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except (ImportError, OSError):  # not Linux, or no IPv4 address on this interface
        return None


def interfaces() -> dict[str, str | None]:
    """{interface name: its IPv4 address or None}, from ``socket.if_nameindex`` and SIOCGIFADDR."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError as err:
        log.debug("socket.if_nameindex() failed: %s", err)
        names = []
    return {name: _ipv4_of(name) for name in names}


def _is_loopback(name: str, addr: str | None) -> bool:
    return name == "lo" or name.startswith("lo:") or (addr is not None and addr.startswith("127."))


def _describe(ifaces: dict[str, str | None]) -> str:
    return ", ".join(f"{n} {a or '(no IPv4)'}" for n, a in ifaces.items()) or "none found"


def _matches(var: str, item: str, names: list[str]) -> list[str]:
    """Interfaces a NCCL_SOCKET_IFNAME item (a prefix, or ``=name`` exact) or a GLOO one (exact) selects."""
    if var.startswith("NCCL") and not item.startswith("="):
        return [n for n in names if n.startswith(item)]
    return [n for n in names if n == item.lstrip("=")]


def _check_ifname_var(var: str, value: str, ifaces: dict[str, str | None]) -> Check:
    names = list(ifaces)
    if var.startswith("NCCL") and value.startswith("^"):  # an exclusion list cannot name a missing interface
        return Check(OK, "network", f"{var}={value} excludes interfaces; found: {_describe(ifaces)}")
    items = [item.strip() for item in value.split(",") if item.strip()]
    missing = [item for item in items if not _matches(var, item, names)]
    if missing:
        return Check(FAIL, "network", f"{var}={value} names {', '.join(missing)}, which this node does not have "
                     f"(interfaces: {_describe(ifaces)})", f"export {var}=<one of: {', '.join(names)}> "
                     "(the interface the nodes share), or unset it")
    chosen = [n for item in items for n in _matches(var, item, names)]
    if not any(ifaces[n] for n in chosen):
        return Check(WARN, "network", f"{var}={value} selects {', '.join(chosen)}, which has no IPv4 address",
                     f"export {var}=<an interface with an address the other nodes reach>")
    return Check(OK, "network", f"{var}={value}: {', '.join(f'{n} {ifaces[n]}' for n in chosen if ifaces[n])}")


def check_network(ifaces: dict[str, str | None], backend: str, nnodes: int) -> list[Check]:
    """Which interface NCCL / gloo would use: a set variable must name existing ones; several candidates warn."""
    checks = [_check_ifname_var(var, os.environ[var].strip(), ifaces)
              for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if os.environ.get(var, "").strip()]
    if checks:
        return checks
    candidates = {n: a for n, a in ifaces.items() if a and not _is_loopback(n, a)}
    verb = "would use" if len(candidates) == 1 else "would pick one of"
    found = f"{backend} {verb} {_describe(candidates)} (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME unset)"
    if len(candidates) > 1:
        return [Check(WARN, "network", f"several interfaces; {found}: a bridge such as docker0 or virbr0 that "
                      "the other nodes cannot reach is a typical cause of hangs", IFNAME_FIX)]
    if not candidates and nnodes > 1:
        return [Check(FAIL, "network", f"only loopback interfaces ({_describe(ifaces)}): the other "
                      f"{nnodes - 1} node(s) cannot reach this one", "run on a node with a network interface "
                      "the nodes share (in a container: --network host)")]
    if not candidates:
        return [Check(OK, "network", "loopback only: fine for one node")]
    return [Check(OK, "network", found)]


# ---------------------------------------------------------------- 4. rendezvous address, 5. port


def _resolve(host: str) -> str:
    """The first address ``host`` resolves to (IPv4 or IPv6); raises OSError when it does not resolve."""
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_master_addr(site: Site) -> Check:
    """MASTER_ADDR resolves; with several nodes expected it must not be a loopback address."""
    try:
        addr = _resolve(site.master_addr)
    except OSError as err:
        return Check(FAIL, "rendezvous", f"MASTER_ADDR={site.master_addr} does not resolve ({err})",
                     "set MASTER_ADDR (or --master-addr) to an IP address or a hostname every node resolves "
                     "(check DNS and /etc/hosts)")
    found = f"MASTER_ADDR={site.master_addr} -> {addr}, {site.nnodes} node(s) ({site.nnodes_source})"
    if site.nnodes > 1 and _loopback(addr):
        return Check(FAIL, "rendezvous", f"{found}: a loopback address, which the other nodes cannot reach",
                     "set MASTER_ADDR to the first node's address that the other nodes can reach (e.g. "
                     "`scontrol show hostnames $SLURM_JOB_NODELIST | head -1` under Slurm)")
    return Check(OK, "rendezvous", found)


def check_hostname(site: Site) -> Check:
    """The hostname resolves to an address other nodes reach (gloo uses it unless GLOO_SOCKET_IFNAME is set)."""
    try:
        addr = _resolve(site.hostname)
    except OSError as err:
        addr, problem = None, f"hostname {site.hostname} does not resolve ({err})"
    else:
        problem = f"hostname {site.hostname} resolves to {addr}, a loopback address" if _loopback(addr) else ""
    if not problem:
        return Check(OK, "hostname", f"{site.hostname} -> {addr}")
    if site.nnodes == 1:
        return Check(OK, "hostname", f"{problem}: fine for one node")
    if any(os.environ.get(v, "").strip() for v in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")):
        return Check(OK, "hostname", f"{problem}; the interface variable set above decides instead")
    return Check(WARN, "hostname", f"{problem} (a common /etc/hosts problem inside containers)",
                 f"map {site.hostname} to this node's reachable address in /etc/hosts, or {IFNAME_FIX}")


def check_port(site: Site) -> Check:
    """On node rank 0, MASTER_PORT can be bound on 0.0.0.0 (nobody listens there yet)."""
    port = site.master_port
    if not 1 <= port <= 65535:
        return Check(FAIL, "port", f"MASTER_PORT={port} is not a TCP port", "use a port in 1024..65535, e.g. 29500")
    if site.node_rank != 0:
        return Check(OK, "port", f"MASTER_PORT={port}: not needed on node rank {site.node_rank} (node rank 0 "
                     "listens on it)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            return Check(FAIL, "port", f"MASTER_PORT={port} cannot be bound on 0.0.0.0 ({err}): in use?",
                         f"pick another port with MASTER_PORT / --rdzv-endpoint, or find the process with "
                         f"`ss -ltnp 'sport = :{port}'`")
    return Check(OK, "port", f"MASTER_PORT={port} is free on 0.0.0.0 (node rank 0)")


# ---------------------------------------------------------------- 6. checkpoint folder


def checkpoint_root(cfg) -> str:
    """checkpoint.dir, or <logging.output_dir>/checkpoints (as the Checkpointer does)."""
    return cfg.checkpoint.dir or os.path.join(cfg.logging.output_dir, "checkpoints")


def _safe_host(host: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in host) or "unknown"


def check_checkpoint_folder(root: str, site: Site) -> list[Check]:
    """Creates ``root``, writes this host's marker atomically and reads it back; lists the other hosts' markers."""
    from dsoft_dist.utils import __version__, write_text_atomic

    fix = ("set --set checkpoint.dir=<a folder you can write> (or logging.output_dir), on a file system "
           "every node shares")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        return [Check(FAIL, "ckpt-folder", f"cannot create the checkpoint folder {root}: {err}", fix)]
    host = _safe_host(site.hostname)
    marker = os.path.join(root, MARKER_PREFIX + host)
    text = (f"dsoft doctor marker: host {site.hostname}, node rank {site.node_rank}, "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}, dsoft_dist {__version__}. "
            "Small; safe to delete.\n")
    try:
        write_text_atomic(marker, text)
        with open(marker, encoding="utf-8") as fh:
            ok = fh.read() == text
    except OSError as err:
        return [Check(FAIL, "ckpt-folder", f"the checkpoint folder {root} is not writable: {err}", fix)]
    if not ok:
        return [Check(FAIL, "ckpt-folder", f"{marker} reads back different from what was written", fix)]
    return [Check(OK, "ckpt-folder", f"{root} is writable (marker {MARKER_PREFIX + host} left there)"),
            _check_shared(root, host, site.nnodes)]


def _check_shared(root: str, host: str, nnodes: int) -> Check:
    hosts = sorted(n[len(MARKER_PREFIX):] for n in os.listdir(root)
                   if n.startswith(MARKER_PREFIX) and ".tmp." not in n)
    found = f"markers from {len(hosts)} host(s): {', '.join(hosts)}"
    if nnodes > 1 and hosts == [host]:
        return Check(WARN, "ckpt-shared", f"{found}; {nnodes} nodes expected",
                     f"run dsoft doctor on every node: the folder must be one that every node sees (a shared "
                     f"file system); only {host} has written here so far")
    if nnodes > 1 and len(hosts) < nnodes:
        return Check(WARN, "ckpt-shared", f"{found}; {nnodes} nodes expected",
                     "run dsoft doctor on the remaining nodes; a node whose marker never appears does not see "
                     "this folder")
    return Check(OK, "ckpt-shared", found)


# ---------------------------------------------------------------- 7. free disk for the checkpoints


def _state_bytes_per_value(o) -> int:
    """Optimizer state bytes per fp32 weight: SGD momentum 4, Adam/AdamW exp_avg + exp_avg_sq 8."""
    if o.name in ("adam", "adamw"):
        return 8
    return 4 if o.momentum > 0 else 0


def estimate_checkpoint_bytes(cfg) -> tuple[int, str]:
    """(bytes of one checkpoint, how it was counted): fp32 backbone + head weights, their optimizer state.

    Backbone: numel of parameters and buffers of ``build_backbone(cfg)`` built on the meta device (no memory).
    Head: num_classes x embedding_size fp32 weights, the same optimizer state (AdamW also keeps a per-row
    int64 step count). Plus FIXED_OVERHEAD_BYTES.
    """
    from dsoft_dist.train.build import build_backbone

    with torch.device("meta"):
        model = build_backbone(cfg)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    per_value = _state_bytes_per_value(cfg.optimizer)
    rows, dim = cfg.data.num_classes, cfg.model.embedding_size
    backbone = params * (4 + per_value) + buffers * 4
    head = rows * dim * (4 + per_value) + (rows * 8 if per_value == 8 else 0)
    state = {0: "no optimizer state", 4: "sgd momentum", 8: "adam moments"}[per_value]
    how = f"backbone {params / 1e6:.2f}M parameters, head {rows} x {dim}, fp32 weights + {state}"
    return backbone + head + FIXED_OVERHEAD_BYTES, how


def _existing_folder(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_disk(cfg, root: str) -> Check:
    """The checkpoints kept (keep_last, +1 being written, +1 for keep_best) fit in the folder's free space."""
    one, how = estimate_checkpoint_bytes(cfg)
    c = cfg.checkpoint
    kept = c.keep_last + 1 + (1 if c.keep_best else 0)
    need = one * kept
    folder = _existing_folder(root)
    free = disk_usage(folder).free
    gib = 2 ** 30
    found = (f"one checkpoint ~ {one / gib:.3f} GiB ({how}); {kept} kept at most (keep_last={c.keep_last}, "
             f"+1 being written{', +1 best' if c.keep_best else ''}) = {need / gib:.2f} GiB; "
             f"{free / gib:.2f} GiB free in {folder}")
    fix = (f"free space there, point checkpoint.dir to a larger shared file system, or lower "
           f"checkpoint.keep_last (now {c.keep_last})")
    if free < need:
        return Check(FAIL, "disk", found, fix)
    if free < 2 * need:
        return Check(WARN, "disk", f"{found}: less than twice what is needed", fix)
    return Check(OK, "disk", found)


# ---------------------------------------------------------------- 8. training data, 9. run folder


def check_data(data) -> Check:
    """The training data as the run will find it: the manifest loads and agrees with the config, and every
    local shard it lists exists (sizes and checksums: ``dsoft data verify``)."""
    from dsoft_dist.data.pipeline import check_shards
    from dsoft_dist.registry import DATA_SOURCES

    if data.source == "synthetic":
        return Check(OK, "data", f"synthetic {data.synthetic_mode}: {data.num_classes} classes x "
                                 f"{data.samples_per_class} samples, generated on the fly")
    if data.source != "webdataset":  # a registered source of its own: its pre-start check
        try:
            DATA_SOURCES.get(data.source).check(data)
        except (OSError, ValueError) as err:
            return Check(FAIL, "data", str(err), fix="see the message")
        return Check(OK, "data", f"data.source={data.source}: its check passed, {data.num_classes} classes")
    try:
        urls, counts, _ = check_shards(data)
    except (OSError, ValueError) as err:
        return Check(FAIL, "data", str(err), fix="see the message; `dsoft data verify DIR` checks a shard folder")
    samples = f", {sum(counts):,} samples" if counts is not None else " (no manifest: counts unknown)"
    return Check(OK, "data", f"{len(urls)} shards{samples}, {data.num_classes} classes")


def check_run_folder(cfg) -> Check:
    """Whether logging.output_dir may take this run (``dsoft_dist.train.runfolder``): new, resumed or refused."""
    from dsoft_dist.train.runfolder import check_run_folder as problem_of
    from dsoft_dist.train.runfolder import recorded_identity

    try:
        problem = problem_of(cfg)
    except (OSError, ValueError) as err:
        problem = str(err)
    if problem is not None:
        return Check(FAIL, "run-folder", problem, fix="see the message")
    held = recorded_identity(cfg) is not None
    if held and cfg.logging.overwrite:
        what = "a new run; the run it holds is deleted first (logging.overwrite)"
    else:
        what = "continues the run it holds" if held and cfg.checkpoint.resume == "auto" else "a new run"
    return Check(OK, "run-folder", f"{cfg.logging.output_dir}: {what}")

