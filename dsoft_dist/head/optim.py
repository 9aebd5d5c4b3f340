"""Row-sparse SGD and AdamW for the class shard: only the rows touched in a step change.

    opt = build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.1, head_mode="sparse"))
    loss = head(emb, labels); loss.backward(); opt.step(); opt.zero_grad()

"Touched rows" are the rows present in the weight gradient: the indices of a sparse COO
gradient (what the head gives for sampled negatives), or every row of a dense gradient.
In ``sparse`` mode only those rows get weight decay, a momentum / moment update and a
step; all other rows and their state stay bit-identical, so a step costs O(K D).
``dense`` mode densifies the gradient and updates every row like torch.optim.SGD/AdamW on
the whole shard (for parity runs). State tensors have the shard's rows and re-shard with
it (``state_dict`` is keyed by global class range; see dsoft_dist.head.state).

Per row, with g the row's gradient (torch's formulas, applied row-wise):
    SGD:   g += wd w;  b = m b + g;  g = g + m b (nesterov) or b;  w -= lr g
    AdamW: w *= 1 - lr wd;  m1 = lerp(m1, g, 1 - b1);  m2 = b2 m2 + (1 - b2) g^2;  t += 1
           w -= lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)
AdamW counts steps per row (t = the number of steps that touched the row), so a row
behaves exactly as torch.optim.AdamW run on that row alone, in the steps that touched it.
"""
from __future__ import annotations

import torch

from dsoft_dist.registry import OPTIMIZERS

_MODES = ("sparse", "dense")


def _row_groups(grad: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A sparse (rows, D) gradient as [(rows (n,), values (n, D))] groups in which every row appears once.

    The head's gradient is a sorted run of distinct rows (the columns), then one slot per
    batch row for the owned targets outside them (``dsoft_dist.head.weight_grad``; unused
    slots add zeros to the run's first row). Coalescing all of it would sort and copy every
    value, 10^5 rows a step; here the run is used as it is and only the slots are coalesced.
    A slot that adds a nonzero gradient to a row of the run falls back to ``coalesce``.
    """
    if grad._nnz() == 0 or grad.is_coalesced() or grad._indices().shape[0] != 1:
        return _one_group(grad)
    idx, values = grad._indices()[0], grad._values()
    breaks = torch.nonzero(idx[1:] <= idx[:-1])
    n_run = int(breaks[0]) + 1 if breaks.numel() else idx.numel()
    if n_run == idx.numel():
        return [(idx, values)]
    run = idx[:n_run]
    tail = torch.sparse_coo_tensor(idx[None, n_run:], values[n_run:], grad.shape, check_invariants=False).coalesce()
    t_rows, t_values = tail.indices()[0], tail.values()
    shared = run[torch.searchsorted(run, t_rows).clamp_(max=n_run - 1)] == t_rows
    if bool(shared.any()):
        if bool(t_values[shared].any()):
            return _one_group(grad)
        t_rows, t_values = t_rows[~shared], t_values[~shared]  # zeros added to rows of the run change nothing
    return [(run, values[:n_run])] + ([(t_rows, t_values)] if t_rows.numel() else [])


def _one_group(grad: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole sparse gradient, coalesced, as one (rows, values) group."""
    grad = grad.coalesce()
    return [(grad.indices()[0], grad.values())]


def product_gradient(lhs, rhs, row_coef=None, values=None, out=None):
    """The rows' gradient from its product form: lhs (n, m) @ rhs (m, D) + row_coef (n,)[:, None] * values (n, D)
    (row_coef None: the product alone), in ``out`` when given."""
    grad = torch.mm(lhs, rhs, out=out)
    return grad.addcmul_(values, row_coef[:, None]) if row_coef is not None else grad


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared plumbing: touched rows from the gradient, row gather/scatter, shard metadata."""

    kind = ""
    _state_names: tuple[str, ...] = ()

    def __init__(self, params, defaults, mode, num_classes=None, class_start=0):
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is invalid; use 'sparse' (row-sparse updates) or 'dense' (torch parity)")
        if defaults["lr"] <= 0:
            raise ValueError(f"lr={defaults['lr']} is invalid: must be > 0")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"weight_decay={defaults['weight_decay']} is invalid: must be >= 0")
        super().__init__(params, defaults)
        self.mode = mode
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.dim() != 2:
                raise ValueError(f"row-sparse optimizers update 2-D (rows, D) weights, got shape {tuple(p.shape)}")
            for name in self._state_names:  # allocated up front: re-sharding never meets missing state
                if name == "step":
                    self.state[p][name] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)  # (rows,)
                else:
                    self.state[p][name] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # (rows, D)
        self.class_start = class_start
        self.num_classes = num_classes if num_classes is not None else (params[0].shape[0] if params else 0)

    def _touched(self, p):
        """[(rows or None for all rows, gradient (n, D))] for param p, each row in one entry; [] when p has no
        gradient."""
        grad = p.grad
        if grad is None:
            return []
        if grad.is_sparse:
            if self.mode == "dense":
                return [(None, grad.to_dense())]
            return _row_groups(grad)
        return [(None, grad)]

    @staticmethod
    def _take(t, rows):
        return t if rows is None else t.index_select(0, rows)

    @staticmethod
    def _put(t, rows, value):
        if rows is not None:
            t.index_copy_(0, rows, value)

    @torch.no_grad()
    def step(self, closure=None):
        """Updates the touched rows of every parameter; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                for rows, grad in self._touched(p):
                    self._ensure_state(p, group)
                    self._update(p, self.state[p], rows, grad.to(p.dtype), group)
        return loss

    @torch.no_grad()
    def update_rows(self, p, grad, rows=None, start=0, mask=None, values=None):
        """One step for some rows of ``p``, given their whole gradient for this step.

        ``grad`` (n, D) belongs to the rows ``rows`` (n,) (unique local ids), or to the slice
        [start, start + n) when rows is None. This is how the head applies the optimizer
        inside backward (``ShardedClassifier.step_in_backward``); the rows and their state change
        exactly as a ``step()`` with a gradient on those rows would change them. ``mask`` (n,)
        bool (with a row list): only the rows where it is True step; the others, which may
        repeat, are written back unchanged (fixed-size row lists need no host sync). ``values`` (n, D),
        with a row list: a copy of p[rows] in p's dtype that the caller gives up (the head's gathered
        chunk rows); the step works in it instead of gathering the rows again.
        """
        w, state, rows, group = self._rows_to_update(p, rows, start, grad.shape[0])
        before = None if mask is None else [t.index_select(0, rows) for t in (p, *state.values())]
        self._update(w, state, rows, grad.to(p.dtype), group, w=values if rows is not None else None)
        if before is not None:
            for t, old in zip((p, *state.values()), before):
                keep = mask.view(-1, *([1] * (old.dim() - 1)))
                t.index_copy_(0, rows, torch.where(keep, t.index_select(0, rows), old))

    @torch.no_grad()
    def update_rows_product(self, p, lhs, rhs, row_coef=None, values=None, rows=None, start=0, out=None,
                            epilogues=None):
        """``update_rows`` with the gradient given as lhs (n, m) @ rhs (m, D) + row_coef (n,)[:, None] * values.

        ``values`` (n, D) are the rows' current values, p[rows] (needed with ``row_coef``); with a
        row list they may be overwritten (SGD updates them in place and copies them back). This is the
        form of the head's chunk gradient (one GEMM plus the radial term of the row
        normalization, a multiple of each row). SGD without nesterov runs the GEMM straight
        into its momentum buffer (``addmm`` with beta = momentum), which saves the passes over
        a separate gradient; the other optimizers form the gradient (in ``out`` when given)
        and take the ``update_rows`` path. Same result as ``update_rows`` to rounding.
        ``epilogues``: the cpu-c backend's compiled passes (the SGD tail runs in one), or None.
        """
        w, state, rows, group = self._rows_to_update(p, rows, start, lhs.shape[0])
        same_dtype = lhs.dtype == rhs.dtype == p.dtype and (values is None or values.dtype == p.dtype)
        if same_dtype and self._update_product(w, state, rows, lhs, rhs, row_coef, values, group, epilogues):
            return
        grad = product_gradient(lhs, rhs, row_coef, values, out)
        self._update(w, state, rows, grad.to(p.dtype), group)

    def _rows_to_update(self, p, rows, start, n):
        """(param or its row slice, state (or its row slices), rows, group) for ``update_rows``."""
        if self.mode != "sparse":
            raise ValueError(f"update_rows needs mode='sparse' (this optimizer has mode={self.mode!r}): dense mode "
                             f"also steps the rows without a gradient")
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(f"the tensor of shape {tuple(p.shape)} is not a parameter of this optimizer")
        self._ensure_state(p, group)
        if rows is not None:
            return p, self.state[p], rows, group
        rows_slice = slice(start, start + n)
        return p[rows_slice], {name: t[rows_slice] for name, t in self.state[p].items()}, None, group

    @torch.no_grad()
    def step_and_clear(self, p):
        """Steps ``p`` alone from its gradient and sets ``p.grad`` to None (a post-accumulate-grad hook)."""
        for rows, grad in self._touched(p):
            self.update_rows(p, grad, rows=rows)
        p.grad = None

    def _ensure_state(self, p, group):
        """Allocates state a group setting switched on after construction (SGD momentum)."""

    def _update(self, p, state, rows, grad, group, w=None):
        """One step of the rows ``rows`` (None: all of ``p``, or the slice ``p`` is) from ``grad``; ``w``, when
        given, is a copy of p[rows] the step may work in instead of gathering the rows itself."""
        raise NotImplementedError

    def _update_product(self, p, state, rows, lhs, rhs, row_coef, values, group, epilogues=None) -> bool:
        """The update from the product form of the gradient (see update_rows_product); False: not
        supported here, the caller forms the gradient instead."""
        return False

    def state_dict(self) -> dict:
        """This rank's piece of the world-size-independent optimizer state (dsoft_dist.head.state)."""
        from dsoft_dist.head.state import optimizer_piece
        return optimizer_piece(self)

    def load_state_dict(self, state_dict) -> None:
        """Loads this rank's rows from one piece or a list of pieces written by any number of ranks."""
        from dsoft_dist.head.state import load_optimizer_pieces
        load_optimizer_pieces(self, state_dict)


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum, coupled weight decay and optional nesterov, applied to touched rows only.

    mode="dense" matches torch.optim.SGD(params, lr, momentum, weight_decay=wd, nesterov) on the
    whole shard. num_classes / class_start place the shard in the global class range (for
    re-shardable state); build_head_optimizer fills them from the head.
    """

    kind = "sgd"

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False, mode="sparse",
                 num_classes=None, class_start=0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum} is invalid: must be in [0, 1)")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        self._state_names = ("momentum_buffer",) if momentum > 0 else ()
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, mode, num_classes, class_start)

    def _ensure_state(self, p, group):
        if group["momentum"] > 0 and "momentum_buffer" not in self.state[p]:  # momentum switched on later
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _update(self, p, state, rows, grad, group, w=None):
        """In place, no (n, D) temporaries: m b + (g + wd w) is computed as (m b + g) + wd w."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        w = self._take(p, rows) if w is None else w  # (n, D); the parameter itself when every row is touched
        if momentum == 0:
            if wd != 0:
                w.mul_(1 - lr * wd)  # w - lr (g + wd w)
            w.add_(grad, alpha=-lr)
        else:
            buf = self._take(state["momentum_buffer"], rows)
            buf.mul_(momentum).add_(grad)
            if wd != 0:
                buf.add_(w, alpha=wd)
            self._put(state["momentum_buffer"], rows, buf)
            if group["nesterov"]:  # w - lr (g + wd w + m b)
                if wd != 0:
                    w.mul_(1 - lr * wd)
                w.add_(grad, alpha=-lr).add_(buf, alpha=-lr * momentum)
            else:
                w.add_(buf, alpha=-lr)
        self._put(p, rows, w)

    def _update_product(self, p, state, rows, lhs, rhs, row_coef, values, group, epilogues=None):
        """g = lhs @ rhs + c w with c = row_coef (+ wd): b = m b + lhs @ rhs + c w is one addmm and one
        addcmul, then w -= lr b; without momentum, w (1 - lr c) - lr lhs @ rhs. Nesterov needs g itself."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        if group["nesterov"]:
            return False
        # (n, D): the parameter's rows themselves when they are a slice; for a row list the caller's
        # copy ``values`` serves as the working copy (one gather fewer), else a fresh gather
        w = values if rows is not None and values is not None else self._take(p, rows)
        coef = row_coef + wd if row_coef is not None else None  # (n,)
        if momentum == 0:
            if coef is not None:
                w.mul_(coef.mul(-lr).add_(1.0)[:, None])
            elif wd != 0:
                w.mul_(1 - lr * wd)
            w.addmm_(lhs, rhs, alpha=-lr)
        else:
            buf = self._take(state["momentum_buffer"], rows).addmm_(lhs, rhs, beta=momentum)
            epi = _epilogues_for(w, buf, coef, values, epilogues)
            if epi is not None:  # buf += coef w; w -= lr buf in one pass
                epi.sgd_tail(w, buf, coef, lr)
            else:
                if coef is not None:
                    buf.addcmul_(values if values is not None else w, coef[:, None])
                elif wd != 0:
                    buf.add_(w, alpha=wd)
                w.add_(buf, alpha=-lr)
            self._put(state["momentum_buffer"], rows, buf)
        self._put(p, rows, w)
        return True


def _epilogues_for(w, buf, coef, values, epilogues):
    """``epilogues`` (the cpu-c backend's) when the SGD tail can run in them: float32 CPU rows w (the same
    memory as ``values``, if given) and buf, contiguous, with a per-row coefficient; else None."""
    if epilogues is None or coef is None or w.device.type != "cpu" or w.dtype != torch.float32 \
            or buf.dtype != torch.float32:
        return None
    if not (w.is_contiguous() and buf.is_contiguous()):
        return None
    if values is not None and (values.data_ptr() != w.data_ptr() or values.stride() != w.stride()):
        return None
    return epilogues


class InBackwardStep:
    """What the head calls to step ``param``'s rows inside backward (``ShardedClassifier.step_in_backward``).

    ``update(grad, rows=None, start=0, mask=None, values=None)`` takes a chunk's gradient (and the rows'
    gathered values, see ``update_rows``), ``update.product(lhs, rhs,
    row_coef, values, rows=None, start=0, out=None)`` the product form of it (see
    ``update_rows_product``).
    """

    def __init__(self, optimizer, param, epilogues=None):
        self.optimizer, self.param, self.epilogues = optimizer, param, epilogues

    def __call__(self, grad, rows=None, start=0, mask=None, values=None):
        self.optimizer.update_rows(self.param, grad, rows=rows, start=start, mask=mask, values=values)

    def product(self, lhs, rhs, row_coef=None, values=None, rows=None, start=0, out=None):
        self.optimizer.update_rows_product(self.param, lhs, rhs, row_coef, values, rows=rows, start=start, out=out,
                                           epilogues=self.epilogues)


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay) with per-row step counts, applied to touched rows only.

    mode="dense" matches torch.optim.AdamW(params, lr, betas, eps, weight_decay) on the whole shard.
    """

    kind = "adamw"
    _state_names = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, mode="sparse",
                 num_classes=None, class_start=0):
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} is invalid: two numbers in [0, 1), e.g. (0.9, 0.999)")
        if eps <= 0:
            raise ValueError(f"eps={eps} is invalid: must be > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, mode, num_classes, class_start)

    def _update(self, p, state, rows, grad, group, w=None):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        w = self._take(p, rows) if w is None else w  # (n, D)
        m1, m2 = self._take(state["exp_avg"], rows), self._take(state["exp_avg_sq"], rows)
        t = self._take(state["step"], rows).add_(1)  # (n,) steps that touched each row
        if wd != 0:
            w.mul_(1 - lr * wd)
        m1.lerp_(grad, 1 - beta1)
        m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t64 = t.to(torch.float64)
        step_size = (lr / (1 - torch.pow(beta1, t64))).to(p.dtype)[:, None]  # (n, 1)
        bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, t64)).to(p.dtype)[:, None]  # (n, 1)
        denom = m2.sqrt().div_(bc2_sqrt).add_(eps).div_(step_size)  # one (n, D) temporary
        w.addcdiv_(m1, denom, value=-1.0)
        for name, value in (("exp_avg", m1), ("exp_avg_sq", m2), ("step", t)):
            self._put(state[name], rows, value)
        self._put(p, rows, w)


def build_head_optimizer(head, cfg) -> _RowSparseOptimizer:
    """The head's optimizer from an OptimizerConfig: the row-sparse optimizer ``OPTIMIZERS`` registers under
    ``cfg.name`` (sgd | adamw, ``dsoft_dist.train.optimizers``) in ``cfg.head_mode`` (sparse | dense).

    With ``cfg.head_step_in_backward`` true the optimizer also steps in the head's backward
    (``head.step_in_backward``): ``optimizer.step()`` then has nothing to do for the head. Unset
    (None) is not set here; the trainer resolves it (``dsoft_dist.train.build``).
    """
    shard = dict(mode=cfg.head_mode, num_classes=head.num_classes, class_start=head.class_start)
    opt = OPTIMIZERS.get(cfg.name).head([head.weight], cfg, shard)
    if cfg.head_step_in_backward:
        head.step_in_backward(opt)
    return opt
