"""What each loss does to the target and the hardest negatives of training runs, checkpoint by checkpoint.

Why does D-Softmax trail ArcFace on image identities? This measures, on the checkpoints of ``dsoft train``
runs, what both losses (and the run's own loss) would do to the same embeddings at each step:

    dsoft bench terms --runs runs/dsoft runs/arcface --samples 2048 --out runs/terms

Each run folder (``logging.output_dir``) must hold checkpoints at several steps: train it with
``checkpoint.every_steps=K`` and ``checkpoint.keep_last`` at least steps / K. The measured samples are N
training samples of the run's own data, the same at every step: for ``data.source=synthetic`` the first N
of the epoch-0 order the training stream draws (rank 0 of 1, no augmentation); for other sources the first
N of the run's loader (rank 0 of 1, one process, augmentation off). The backbone runs in eval mode and its
embeddings go to the head as in training (no flip). With z = cosines of the L2-normalized embeddings with
the L2-normalized class weights W (C, D), every class a negative (a run that sampled negatives is measured
on all of them), per row:

- z_y, the hardest negative z_h = max_{k != y} z_k, their angles and the gap theta_h - theta_y (degrees);
  the negatives' LSE_{k != y} s z_k; saturated: z_y > d (D-Softmax's intra term has let the row go);
- |dL/dz_y| and |dL/dz_h| by autograd through ``dsoft_dist.losses.functional`` of: D-Softmax's intra term
  softplus(s (d - z_y)), its inter term times w, w softplus(LSE_k s z_k), their sum ``d_softmax``,
  ``arcface`` at the same s (m2 = 0.5), and ``trained``: the run's loss when it is another margin softmax
  (cosface, an arcface with another m, ...). dL/dz_y < 0 and dL/dz_h > 0; their magnitudes are reported;
- the effective margin of each loss (d_softmax, arcface, trained): hold the row's negatives fixed (both
  losses see them only through LSE_{k != y} s z_k) and move the target cosine t from the decision boundary
  t = z_h up to 1. g(t) = |dL/dt| is the pull the loss still puts on the target; z* is the first t at
  which g(t) falls to g(z_h) / 2, found by a 256-point scan of [z_h, 1 - 1e-9] and vectorized bisection
  on the autograd gradient, and the margin is theta_h - acos(z*) in degrees: how far past the boundary
  the loss keeps pulling at half strength or more. A row where g never halves before t = 1 (ArcFace with
  theta_h < m: the target logit cos(theta + m) cannot beat z_h, and d cos(theta + m) / dt grows without
  bound as t -> 1) gets z* = 1, margin theta_h, and counts as capped. For D-Softmax, whose z_y gradient
  is the intra term's, the closed form is z* = d - log(sigma(a) / (2 - sigma(a))) / s with a = s (d - z_h):
  about z_h + log(2) / s when z_h > d (a margin that vanishes as s grows), about d when z_h << d.

Per (run, step) it reports the mean and quartiles of each quantity, the saturated and capped fractions,
and from W alone the class weights' mean pairwise cosine and the mean of each class's largest cosine to
another class. Writes in --out (default runs/terms) ``terms.json`` (every figure and each run's loss, s, d,
w, m, C and steps), ``terms.md`` (a table per run, a row per step) and ``terms.png`` (``terms_report``).
Exit code 2 for a folder without checkpoints or a run whose head is not a cosine head (head.loss softmax).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.losses import functional as LF

ARCFACE = (1.0, 0.5, 0.0)  # (m1, m2, m3) of the ArcFace every run is compared with
GRADIENT_LOSSES = ("intra", "inter", "d_softmax", "arcface", "trained")
MARGIN_LOSSES = ("d_softmax", "arcface", "trained")  # the inter term has no z_y gradient, so no margin
FRACTIONS = ("saturated",) + tuple(f"margin_capped/{n}" for n in MARGIN_LOSSES)
GRID = 256  # scan points of [z_h, TOP] that bracket z*
BISECTIONS = 40  # halvings of a bracket narrower than 1/255: far below float64's resolution of a cosine
TOP = 1.0 - 1e-9  # the scan's end: at t = 1 exactly the reference's clamped sin(theta) drops ArcFace's d psi/dt
BLOCK = 1 << 21  # cosine entries per autograd block (rows x classes), so memory stays bounded for large C


@dataclass(frozen=True)
class LossSettings:
    """What is measured at a row: D-Softmax with scale s, end point d, inter weight w; ArcFace (``ARCFACE``) at
    the same s; ``trained``: the (m1, m2, m3) of the run's own margin softmax when it is not ArcFace's (else
    None)."""

    scale: float
    end_point: float
    inter_weight: float
    trained: tuple | None = None


# ----------------------------------------------------------------------------- per-row measurements

def hardest_negative(cos: torch.Tensor, labels: torch.Tensor):
    """(z_y, z_h, h), each (B,): the target cosine, the largest other cosine and its class, of cos (B, C)."""
    z_y = cos.gather(1, labels[:, None])[:, 0]
    others = cos.scatter(1, labels[:, None], float("-inf"))  # (B, C): the target can never be the hardest
    z_h, h = others.max(dim=1)
    return z_y, z_h, h


def negatives_lse(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """LSE_{k != y} s z_k per row (B,): the s-scaled log-sum-exp of the negatives (``masked_logsumexp``)."""
    mask = ~F.one_hot(labels, cos.shape[1]).bool()  # (B, C)
    return LF.masked_logsumexp(scale * cos, mask)


def row_losses(cos: torch.Tensor, labels: torch.Tensor, st: LossSettings) -> dict[str, torch.Tensor]:
    """Per-row losses (B,) of cos (B, C) through the references: intra, inter (times w), d_softmax, arcface
    and, when ``st.trained`` is set, the trained margin softmax."""
    intra, inter = LF.d_softmax_terms(cos, labels, st.scale, st.end_point)
    out = {"intra": intra, "inter": st.inter_weight * inter,
           "d_softmax": intra + st.inter_weight * inter,  # LF.d_softmax's per-row sum of the same two terms
           "arcface": LF.margin_softmax(cos, labels, st.scale, *ARCFACE, reduction="none")}
    if st.trained is not None:
        out["trained"] = LF.margin_softmax(cos, labels, st.scale, *st.trained, reduction="none")
    return out


def row_gradients(cos: torch.Tensor, labels: torch.Tensor, hardest: torch.Tensor, st: LossSettings) -> dict:
    """{loss: (dL/dz_y, dL/dz_h)}, each (B,), by autograd of ``row_losses``: a row's loss depends on its own
    cosines only, so the gradient of the rows' sum holds every row's own gradient."""
    x = cos.detach().to(torch.float64).requires_grad_(True)  # (B, C)
    out = {}
    for name, per_row in row_losses(x, labels, st).items():
        (g,) = torch.autograd.grad(per_row.sum(), x, retain_graph=True)  # (B, C)
        out[name] = (g.gather(1, labels[:, None])[:, 0], g.gather(1, hardest[:, None])[:, 0])
    return out


def target_gradient(name: str, t: torch.Tensor, lse: torch.Tensor, st: LossSettings) -> torch.Tensor:
    """|dL/dt| (B, G) of loss ``name`` at target cosines t (B, G) with each row's negatives held fixed as their
    s-scaled LSE (B,): one negative column carrying the LSE gives the references exactly the row's inter sum."""
    rows, grid = t.shape
    tt = t.detach().reshape(-1).clone().requires_grad_(True)  # (B G,)
    neg = lse.detach().repeat_interleave(grid)[:, None]  # (B G, 1)
    mask = torch.ones_like(neg, dtype=torch.bool)
    if name == "d_softmax":
        loss = LF.d_softmax_from_parts(tt, neg / st.scale, mask, st.scale, st.end_point, st.inter_weight,
                                       reduction="sum")
    else:
        margins = ARCFACE if name == "arcface" else st.trained
        loss = LF.margin_softmax_from_parts(st.scale * LF.margin_target(tt, *margins), neg, mask, reduction="sum")
    (g,) = torch.autograd.grad(loss, tt)
    return g.abs().reshape(rows, grid)


def effective_margin(name: str, z_h: torch.Tensor, lse: torch.Tensor, st: LossSettings):
    """(margin (B,) in degrees, capped (B,) bool): theta_h - acos(z*), z* the first t in [z_h, TOP] where
    |dL/dt| falls to half its value at t = z_h (module doc); z* = 1 where it never does (capped)."""
    frac = torch.linspace(0.0, 1.0, GRID, dtype=z_h.dtype)
    start = z_h.clamp(max=TOP)
    t = start[:, None] + (TOP - start[:, None]) * frac  # (B, G), t[:, 0] = z_h
    g = target_gradient(name, t, lse, st)  # (B, G)
    half = g[:, 0] / 2  # (B,)
    below = g[:, 1:] <= half[:, None]  # (B, G - 1)
    found = below.any(dim=1)
    j = below.to(torch.int8).argmax(dim=1) + 1  # the first grid point at or below half (when found)
    lo, hi = t.gather(1, (j - 1)[:, None])[:, 0], t.gather(1, j[:, None])[:, 0]
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        at = target_gradient(name, mid[:, None], lse, st)[:, 0] <= half
        lo, hi = torch.where(at, lo, mid), torch.where(at, mid, hi)
    z_star = torch.where(found, (lo + hi) / 2, torch.ones_like(lo))
    theta_h = torch.rad2deg(torch.acos(z_h.clamp(-1.0, 1.0)))
    return theta_h - torch.rad2deg(torch.acos(z_star.clamp(-1.0, 1.0))), ~found


def measure_rows(cos: torch.Tensor, labels: torch.Tensor, st: LossSettings) -> dict[str, torch.Tensor]:
    """Every per-row quantity (B,) of cos (B, C) float64 and labels (B,) int64 (module doc): z_y, z_h, their
    angles and gap (degrees), lse_neg, saturated (1.0 / 0.0), grad_y/<loss> and grad_h/<loss> (magnitudes),
    margin_deg/<loss> and margin_capped/<loss>."""
    z_y, z_h, h = hardest_negative(cos, labels)
    theta_y, theta_h = (torch.rad2deg(torch.acos(z.clamp(-1.0, 1.0))) for z in (z_y, z_h))
    lse = negatives_lse(cos, labels, st.scale)
    rows = {"z_y": z_y, "z_h": z_h, "theta_y_deg": theta_y, "theta_h_deg": theta_h, "gap_deg": theta_h - theta_y,
            "lse_neg": lse, "saturated": (z_y > st.end_point).to(cos.dtype)}
    for name, (g_y, g_h) in row_gradients(cos, labels, h, st).items():
        rows[f"grad_y/{name}"], rows[f"grad_h/{name}"] = g_y.abs(), g_h.abs()
    for name in MARGIN_LOSSES:
        if name == "trained" and st.trained is None:
            continue
        margin, capped = effective_margin(name, z_h, lse, st)
        rows[f"margin_deg/{name}"], rows[f"margin_capped/{name}"] = margin, capped.to(cos.dtype)
    return {k: v.detach() for k, v in rows.items()}


def measure_cosines(cos: torch.Tensor, labels: torch.Tensor, st: LossSettings) -> dict[str, torch.Tensor]:
    """``measure_rows`` over cos (N, C) in row blocks of at most ``BLOCK`` entries, concatenated (N,)."""
    step = max(1, BLOCK // cos.shape[1])
    parts = [measure_rows(cos[i:i + step], labels[i:i + step], st) for i in range(0, cos.shape[0], step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def summarize(rows: dict[str, torch.Tensor]) -> dict:
    """Per quantity: {mean, q25, median, q75} over the rows; the 0/1 quantities (``FRACTIONS``) as a fraction."""
    out = {}
    for key, v in rows.items():
        v = v.double()
        if key in FRACTIONS:
            out[key] = float(v.mean())
            continue
        q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype))
        out[key] = {"mean": float(v.mean()), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
    return out


def weight_spread(weight: torch.Tensor, max_rows: int = 16384, seed: int = 0) -> dict:
    """From the class weights W (C, D) alone: mean_cos, the mean cosine over pairs of distinct classes
    ((|sum_i w_i|^2 - C) / (C (C - 1)) of the unit rows, exact); mean_max_cos, the mean over classes of the
    largest cosine to another class (over a seeded subset of ``max_rows`` classes when C is larger,
    ``classes_measured`` says how many)."""
    w = F.normalize(weight.double(), dim=1)  # (C, D)
    c = w.shape[0]
    total = w.sum(dim=0)
    mean_cos = (float(total @ total) - c) / (c * (c - 1))
    rows = torch.arange(c) if c <= max_rows else torch.randperm(c, generator=torch.Generator().manual_seed(seed))[
        :max_rows].sort().values
    best = []
    for i in range(0, len(rows), 1024):
        block = rows[i:i + 1024]
        sims = w[block] @ w.T  # (b, C)
        sims[torch.arange(len(block)), block] = float("-inf")  # a class is not its own neighbour
        best.append(sims.max(dim=1).values)
    return {"mean_cos": mean_cos, "mean_max_cos": float(torch.cat(best).mean()), "classes_measured": len(rows)}


# ----------------------------------------------------------------------------- runs and their samples

@dataclass
class Run:
    """A run folder to measure: its step folders (oldest first), its saved config and what is measured."""

    path: str
    name: str
    folders: list
    cfg: object
    settings: LossSettings


def open_run(path: str) -> Run:
    """The run folder (or checkpoint root) ``path``: its checkpoints and the config its newest one saved.

    Raises FileNotFoundError / ValueError (exit 2) for a missing folder, a folder without checkpoints, a
    saved config that no longer loads, or a head that is not a cosine head.
    """
    from dsoft_dist.config.loader import saved_config_from_dict
    from dsoft_dist.losses import margin_losses
    from dsoft_dist.registry import LOSSES
    from dsoft_dist.train.checkpoint import RUN_CHECKPOINTS, STEP_PREFIX, checkpoint_root_of, step_folders
    from dsoft_dist.utils import load_weights_only

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--runs {path}: no such folder; pass dsoft train run folders (logging.output_dir)")
    root = checkpoint_root_of(path)
    names = step_folders(root) if root else []
    if not names:
        raise ValueError(f"--runs {path} holds no checkpoint (no {STEP_PREFIX}N folder in {root or path}): train "
                         "it with checkpoint.every_steps=K and checkpoint.keep_last >= steps / K, then pass it (or "
                         "its checkpoint.dir when that is elsewhere)")
    folders = [os.path.join(root, n) for n in names]
    saved = load_weights_only(os.path.join(folders[-1], "trainer.pt"))["config"]
    try:
        cfg = saved_config_from_dict(saved)
    except ValueError as err:
        raise ValueError(f"--runs {path}: the config saved in {folders[-1]} no longer loads ({err})") from err
    loss = cfg.head.loss
    if not LOSSES.get(loss).normalize:
        raise ValueError(f"--runs {path} trained head.loss={loss}, not a cosine head: the terms are measured on "
                         "cosines; pass runs of d_softmax or a margin softmax (arcface, cosface, normface, ...)")
    if cfg.data.num_classes < 2:
        raise ValueError(f"--runs {path} has data.num_classes={cfg.data.num_classes}: a hardest negative needs "
                         ">= 2 classes")
    margins = cfg.head.margins() if loss in margin_losses() else None  # None: D-Softmax, or a loss of your own
    trained = None if margins is None or tuple(margins) == ARCFACE else tuple(margins)
    # a margin run has no d: D-Softmax's terms are measured on it at the default loss's (d_softmax's preset)
    end_point = LOSSES.get("d_softmax").presets["end_point"] if cfg.head.end_point is None else cfg.head.end_point
    st = LossSettings(cfg.head.scale, end_point, cfg.head.inter_weight, trained)
    name = os.path.basename(os.path.normpath(path))
    if name == RUN_CHECKPOINTS:  # a checkpoint root was passed: name the run by its run folder
        name = os.path.basename(os.path.dirname(os.path.normpath(path))) or name
    return Run(path, name, folders, cfg, st)


def _synthetic_samples(data, n: int):
    """The first n (identity, index) of the epoch-0 order the training stream draws (rank 0 of 1), rendered
    without augmentation: (inputs, labels (n,) int64)."""
    from dsoft_dist.data.datasets import Slot, synthetic_positions
    from dsoft_dist.data.synthetic import SyntheticIdentities, SyntheticVectors, vector_difficulty

    total = data.num_classes * data.samples_per_class
    slot = Slot(rank=0, world_size=1, epoch=0, seed=data.seed)
    ids = next(synthetic_positions(total, slot, worker=0, num_workers=1, block=n))  # (min(n, total),)
    identity, index = np.divmod(ids, data.samples_per_class)
    if data.synthetic_mode == "vectors":
        src = SyntheticVectors(data.num_classes, dim=data.vector_dim, seed=data.seed,
                               **vector_difficulty(data.difficulty))
        return src.batch(identity, index), identity
    if data.synthetic_mode in ("images", "glyphs"):  # GlyphIdentities has SyntheticIdentities' interface
        from dsoft_dist.data.glyphs import GlyphIdentities

        kind = GlyphIdentities if data.synthetic_mode == "glyphs" else SyntheticIdentities
        src = kind(data.num_classes, image_size=data.image_size, seed=data.seed, difficulty=data.difficulty)
        return src.samples(identity, index), identity
    # a new synthetic image mode: its identities class goes above
    raise ValueError(f"data.synthetic_mode={data.synthetic_mode!r} is not supported by dsoft bench terms yet: "
                     "it measures the images, glyphs and vectors modes")


def _loader_samples(data, n: int):
    """The first n samples of the run's loader (rank 0 of 1, epoch 0, no workers, augmentation off)."""
    from dsoft_dist.registry import DATA_SOURCES

    off = {"num_workers": 0, "augment_flip": False, "color_jitter": 0.0, "random_crop": False}
    quiet = replace(data, **{f.name: off[f.name] for f in fields(data) if f.name in off})
    source = DATA_SOURCES.get(quiet.source)
    source.check(quiet)
    xs, ys, got = [], [], 0
    for x, y in source.loader(quiet, 0, 1, 0):
        xs.append(x)
        ys.append(y)
        got += len(y)
        if got >= n:
            break
    if not xs:
        raise ValueError(f"data.source={quiet.source}: the run's loader gave no sample; check its data")
    return torch.cat(xs)[:n], torch.cat(ys)[:n].numpy()


def training_samples(data, n: int):
    """(inputs, labels (n',) int64 numpy) of n' = min(n, epoch size) training samples of a DataConfig."""
    return _synthetic_samples(data, n) if data.source == "synthetic" else _loader_samples(data, n)


def head_weight(folder: str) -> torch.Tensor:
    """The whole (C, D) class weight of a step folder's head, from the pieces of any world size."""
    from dsoft_dist.head import assemble_rows
    from dsoft_dist.utils import load_weights_only

    with open(os.path.join(folder, "head", "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    pieces = [load_weights_only(os.path.join(folder, "head", name))["head"] for name in meta["files"]]
    pieces.sort(key=lambda p: p["class_start"])
    return assemble_rows(pieces, "weight", 0, meta["num_classes"])


def measure_checkpoint(folder: str, inputs, labels: torch.Tensor, st: LossSettings, device, batch: int,
                       weight_at=None) -> dict:
    """One step folder: its backbone's embeddings of the samples (eval mode, no flip), the cosines with its
    head's weight, ``summarize`` of ``measure_cosines`` and the ``weight_spread``. ``weight_at(step)``: the inter
    weight the run's next step applies (head.inter_weight_end's schedule), replacing ``st.inter_weight``."""
    from dsoft_dist.eval.extract import extract_embeddings
    from dsoft_dist.train.ckpt_cli import checkpoint_backbone  # manifest-checked backbone of a step folder

    _, model, _, state = checkpoint_backbone(folder)
    if weight_at is not None:
        st = replace(st, inter_weight=weight_at(int(state["step"])))
    emb = extract_embeddings(model.to(device), inputs, batch_size=batch, device=device, normalize=False)
    weight = head_weight(folder)  # (C, D)
    if emb.shape[1] != weight.shape[1]:
        raise ValueError(f"{folder}: the backbone gives {emb.shape[1]}-d embeddings, the head has "
                         f"{weight.shape[1]}-d class weights: the checkpoint is inconsistent")
    e = F.normalize(torch.from_numpy(emb).double(), dim=1)  # (N, D)
    cos = e @ F.normalize(weight.double(), dim=1).T  # (N, C)
    return {"step": int(state["step"]), **summarize(measure_cosines(cos, labels, st)),
            "weights": weight_spread(weight)}


def run_settings(run: Run, samples: int) -> dict:
    """The run's key settings for the tables and the JSON: loss, s, d, w, m (None for D-Softmax), C, the
    data, and ``trained_as``: which measured loss is the run's own (None for a loss of your own)."""
    from dsoft_dist.losses import margin_losses
    from dsoft_dist.losses.forms import D_SOFTMAX_LOSSES

    h, d = run.cfg.head, run.cfg.data
    margin = h.loss in margin_losses()
    own = "trained" if run.settings.trained else "arcface" if margin else "d_softmax" if h.loss in D_SOFTMAX_LOSSES \
        else None
    # end_point: the d D-Softmax's terms are measured at (a margin run's own head has none)
    return {"loss": h.loss, "scale": h.scale, "end_point": run.settings.end_point, "inter_weight": h.inter_weight,
            "inter_weight_end": h.inter_weight_end,
            "m": list(h.margins()) if margin else None, "num_classes": d.num_classes,
            "embedding_size": run.cfg.model.embedding_size, "model": run.cfg.model.name,
            "negatives": h.negatives, "sample_rate": h.sample_rate, "data": f"{d.source}/{d.synthetic_mode}",
            "samples": samples, "trained_as": own}


def measure_run(run: Run, n: int, device, batch: int, bar) -> dict:
    """Every checkpoint of a run on the same n training samples: {name, path, settings, steps, weights (the
    newest step's ``weight_spread``), rows (a ``measure_checkpoint`` per step, by step)}."""
    from dsoft_dist.train.schedule import inter_weight_at

    inputs, labels = training_samples(run.cfg.data, n)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    rows = []
    for folder in run.folders:
        rows.append(measure_checkpoint(folder, inputs, labels, run.settings, device, batch,
                                       lambda step: inter_weight_at(step, run.cfg.head, run.cfg.schedule)))
        bar.update(1)
    rows.sort(key=lambda r: r["step"])
    return {"name": run.name, "path": run.path, "settings": run_settings(run, len(labels)),
            "steps": [r["step"] for r in rows], "weights": rows[-1]["weights"], "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("terms", __doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, nargs="+", metavar="DIR",
                   help="dsoft train run folders (logging.output_dir), each with checkpoints at several steps "
                   "(checkpoint.every_steps); a folder's name may hold commas, as a sweep's runs do")
    p.add_argument("--samples", type=int, default=2048, help="training samples measured (default 2048)")
    p.add_argument("--out", default="runs/terms", help="output folder (default runs/terms)")
    p.add_argument("--device", default=None, help="where the backbones run (default: cuda when present, else cpu)")
    p.add_argument("--batch", type=int, default=256, help="backbone batch size (default 256)")
    return p


def main(argv: list[str] | None = None) -> int:
    from dsoft_dist.bench.speedup import machine
    from dsoft_dist.bench.terms_report import write_outputs
    from dsoft_dist.observability.progress import progress_bar

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    paths = [p for p in args.runs if p.strip()]
    if not paths:
        raise ValueError(f"--runs {args.runs!r} names no folder: pass run folders, e.g. --runs runs/a runs/b")
    if args.samples < 2 or args.batch < 1:
        raise ValueError(f"--samples {args.samples} / --batch {args.batch}: need >= 2 samples and a batch >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [open_run(p) for p in paths]  # every refusal before the first measurement
    with progress_bar(total=sum(len(r.folders) for r in runs), desc="checkpoints", unit="ckpt") as bar:
        measured = [measure_run(r, args.samples, device, args.batch, bar) for r in runs]
    result = {"machine": machine(argv, "terms"), "samples": args.samples, "arcface_margins": list(ARCFACE),
              "runs": measured}
    paths = write_outputs(result, args.out)
    sys.stdout.write(result["markdown"] + "\n\nwrote " + ", ".join(paths) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
