"""Several folds trained together: their weights stacked, each step run once for all of them.

A CM-ARR training step at batch 16 is about a thousand small operators, and on a GPU its
time is their launch cost, not arithmetic (``benchmarks/model_step.py``). The folds of the
protocol are independent models of the same shape, so :class:`StackedFolds` holds the
weights of ``E`` folds stacked along a leading member axis and runs one step of every fold
as one call of the model under :func:`torch.func.vmap`: the same number of operators as one
fold's step, each ``E`` times larger (``optim.stack_folds``, ``cm-arr-train --stack-folds``).

What stays the same as training the folds one at a time (:class:`~.train.FoldRecipe`, whose
stages are reused for everything but the training step):

- each fold's initial weights, validation split, batch order, and training conditions (each
  fold draws from its own generator, seeded as in its own run);
- the optimizer: :class:`MemberAdam` is Adam / AdamW with a step count per member; a member
  whose epoch has fewer batches than another's sits the extra steps out (no update, no
  moment change, no step counted), so every fold takes exactly its own steps; with
  ``optim.grad_clip`` each member's gradient norm is clipped on its own;
- evaluation, epoch selection, checkpoints (the same files, a fold's own weights and optimizer
  state in ``torch.optim.Adam``'s layout), the log, and resuming: a fold of a stacked run can
  be resumed alone and the other way round.

What differs: dropout draws its masks for all members at once (``vmap(randomness=
"different")``), so the run is not bit-equal to the folds trained one by one (it is, up to
float rounding, with ``model.dropout: 0``, which a test checks); and the final batches of
an epoch, where folds have different batch sizes, run as one call per batch size.

Requires the resident pipeline (every member's batch has the same shape), no
``torch.compile``, no torchrun.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import sample_conditions


class StackedParams:
    """The parameters of ``E`` models of one architecture, stacked along a leading axis.

    Parameter ``name`` is a leaf tensor ``(E, *shape)`` that is a view into one flat buffer
    (``self.flat``), and its ``.grad`` a view into another (``self.flat_grad``), in the same
    layout, so that the optimizer works on two flat tensors with a handful of operators.
    ``member_of[i]`` is the member of element ``i`` of the flat buffers.
    """

    def __init__(self, models: Sequence[torch.nn.Module]):
        named = [dict(m.named_parameters()) for m in models]
        self.names = [n for n, p in named[0].items() if p.requires_grad]
        self.E = E = len(models)
        ref = named[0]
        device, dtype = ref[self.names[0]].device, ref[self.names[0]].dtype
        sizes = [ref[n].numel() for n in self.names]
        total = E * sum(sizes)
        self.flat = torch.empty(total, device=device, dtype=dtype)
        self.flat_grad = torch.zeros(total, device=device, dtype=dtype)
        self.params: dict[str, Tensor] = {}
        self.slices: dict[str, tuple[int, int]] = {}
        member = []
        off = 0
        with torch.no_grad():
            for n, size in zip(self.names, sizes):
                shape = (E, *ref[n].shape)
                view = self.flat[off:off + E * size].view(shape)
                view.copy_(torch.stack([d[n].detach() for d in named]))
                view.requires_grad_()
                view.grad = self.flat_grad[off:off + E * size].view(shape)  # backward accumulates here
                self.params[n] = view
                self.slices[n] = (off, size)
                member.append(torch.arange(E, device=device).repeat_interleave(size))
                off += E * size
        self.member_of = torch.cat(member)

    def member(self, e: int) -> dict[str, Tensor]:
        """Member ``e``'s parameters (views)."""
        return {n: p[e] for n, p in self.params.items()}

    def zero_grad(self) -> None:
        self.flat_grad.zero_()


class MemberAdam:
    """Adam (or AdamW) on :class:`StackedParams`, each member with its own step count.

    ``step(active)`` updates the members where ``active`` (E,) is True and leaves the others
    exactly as they were (weights, moments, step count). The update of an active member is
    ``torch.optim.Adam``'s (``amsgrad=False``): L2 ``weight_decay`` added to the gradient for
    Adam, decoupled for AdamW; bias corrections from the member's own step count.
    """

    def __init__(self, stacked: StackedParams, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False, grad_clip: float = 0.0):
        self.s = stacked
        self.lr, (self.b1, self.b2), self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.wd, self.decoupled, self.grad_clip = float(weight_decay), bool(decoupled), float(grad_clip)
        self.exp_avg = torch.zeros_like(stacked.flat)
        self.exp_avg_sq = torch.zeros_like(stacked.flat)
        self.steps = torch.zeros(stacked.E, device=stacked.flat.device, dtype=torch.float64)

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        s, idx = self.s, self.s.member_of
        a = active.to(self.steps.dtype)
        self.steps += a
        g = s.flat_grad
        if self.grad_clip > 0:  # per member: torch.nn.utils.clip_grad_norm_ of that member's gradients
            sq = torch.zeros(s.E, device=g.device, dtype=g.dtype).index_add_(0, idx, g * g)
            coef = (self.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            g = g * coef[idx]
        if self.wd and not self.decoupled:
            g = g.add(s.flat, alpha=self.wd)
        stepped = self.steps > 0
        bc1 = torch.where(stepped, 1 - self.b1 ** self.steps, torch.ones_like(self.steps))
        bc2 = torch.where(stepped, 1 - self.b2 ** self.steps, torch.ones_like(self.steps))
        dt = s.flat.dtype
        self.exp_avg.lerp_(g, ((1 - self.b1) * a).to(dt)[idx])
        self.exp_avg_sq.lerp_(g * g, ((1 - self.b2) * a).to(dt)[idx])
        if self.wd and self.decoupled:
            s.flat.mul_((1 - self.lr * self.wd * a).to(dt)[idx])
        denom = (self.exp_avg_sq.sqrt() / bc2.sqrt().to(dt)[idx]).add_(self.eps)
        s.flat.addcdiv_(self.exp_avg * (-self.lr * a / bc1).to(dt)[idx], denom)

    # ---- torch.optim.Adam's per-model state, for checkpoints ------------------------------
    def _view(self, flat: Tensor, name: str, e: int) -> Tensor:
        off, size = self.s.slices[name]
        return flat[off + e * size: off + (e + 1) * size].view(self.s.params[name].shape[1:])

    def export_member(self, e: int, opt: torch.optim.Optimizer) -> None:
        """Put member ``e``'s moments and step count into ``opt`` (an optimizer over that fold's
        own model, parameters in the same order), so that its ``state_dict`` is a plain one."""
        params = opt.param_groups[0]["params"]
        for name, p in zip(self.s.names, params):
            st = opt.state[p]
            st["step"] = torch.tensor(float(self.steps[e]), dtype=torch.float32,
                                      device=p.device if opt.defaults.get("fused") else "cpu")
            st["exp_avg"] = self._view(self.exp_avg, name, e).detach().clone()
            st["exp_avg_sq"] = self._view(self.exp_avg_sq, name, e).detach().clone()

    @torch.no_grad()
    def import_member(self, e: int, opt: torch.optim.Optimizer) -> None:
        """Take member ``e``'s moments and step count from ``opt`` (empty state: a fresh start)."""
        params = opt.param_groups[0]["params"]
        steps = set()
        for name, p in zip(self.s.names, params):
            st = opt.state.get(p, {})
            if not st:
                continue
            self._view(self.exp_avg, name, e).copy_(st["exp_avg"])
            self._view(self.exp_avg_sq, name, e).copy_(st["exp_avg_sq"])
            steps.add(float(st["step"]))
        if len(steps) > 1:
            raise ValueError(f"optimizer state of member {e}: parameters at different step counts {sorted(steps)}")
        self.steps[e] = steps.pop() if steps else 0.0


class StackedFolds:
    """Train the folds of ``recipes`` (set up, each possibly resumed) together.

    Each round trains every unfinished fold for its own next epoch in lockstep, then each fold
    goes through :meth:`FoldRecipe.end_epoch` (validation, selection, checkpoints, log) on its
    own; when all are done, each tests its best checkpoint.
    """

    def __init__(self, recipes: Sequence[Any]):
        from torch.func import functional_call, vmap

        self.recipes = list(recipes)
        r0 = self.recipes[0]
        if any(r.pipeline != "resident" for r in self.recipes):
            raise ValueError("stacked folds need data.pipeline = resident")
        self.cfg = r0.cfg
        self.device = r0.device
        models = [r.model for r in self.recipes]
        self.params = StackedParams(models)
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                        for n, _ in models[0].named_buffers()}
        o = self.cfg.optim
        self.opt = MemberAdam(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                              decoupled=o.optimizer == "adamw", grad_clip=o.grad_clip)
        for e, r in enumerate(self.recipes):
            self.opt.import_member(e, r.optimizer)
        self.skeleton = copy.deepcopy(models[0]).to("meta")  # the architecture, no storage

        def loss(p, b, feats, masks, available, present, labels):
            out = functional_call(self.skeleton, (p, b), (feats, masks, available),
                                  dict(present=present, labels=labels, pooled=True, validate=False))
            return out.losses

        self._loss = vmap(loss, randomness="different")
        self._all = torch.ones(len(self.recipes), dtype=torch.bool, device=self.device)

    def _sync_member(self, e: int) -> None:
        """Copy member ``e``'s weights and optimizer state into its recipe's own model."""
        r = self.recipes[e]
        with torch.no_grad():
            own = dict(r.model.named_parameters())
            for n, p in self.params.member(e).items():
                own[n].copy_(p)
        self.opt.export_member(e, r.optimizer)

    def _round(self, members: list[int]) -> dict[int, dict[str, float]]:
        """One epoch of each of ``members`` (indices into recipes), in lockstep."""
        from cmarr.model import LOSS_NAMES

        names = (*LOSS_NAMES, "total")
        E = len(self.recipes)
        self.train()
        epochs = {e: self.recipes[e].epoch + 1 for e in members}
        rows = {e: iter(self.recipes[e].train_rows(epochs[e])) for e in members}
        gens = {e: self.recipes[e].condition_generator(epochs[e]) for e in members}
        sums = torch.zeros(E, len(names), device=self.device)
        steps = torch.zeros(E, dtype=torch.long)
        while True:
            batch = {e: r for e in members if (r := next(rows[e], None)) is not None}
            if not batch:
                break
            self.step(batch, gens, sums)
            steps[list(batch)] += 1
        means = (sums / steps.clamp(min=1).to(self.device).unsqueeze(1)).tolist()
        out = {}
        for e in members:
            out[e] = {f"loss_{k}": v for k, v in zip(names, means[e])} | {"steps": int(steps[e])}
            self.recipes[e].check_loss(epochs[e], out[e]["loss_total"])
        return out

    def train(self) -> None:
        self.skeleton.train()
        for r in self.recipes:
            r.model.train()

    def step(self, batch: dict[int, Tensor], gens: dict[int, torch.Generator], sums: Tensor | None = None) -> None:
        """One optimisation step of the members in ``batch`` (member -> store rows of its
        batch); ``sums`` (E, losses) accumulates their loss terms."""
        from cmarr.model import LOSS_NAMES

        names = (*LOSS_NAMES, "total")
        E = len(self.recipes)
        groups: dict[int, list[int]] = {}
        for e, r in batch.items():
            groups.setdefault(len(r), []).append(e)
        total = None
        for group in groups.values():
            b = self.recipes[0].res_full.batch(torch.stack([batch[e] for e in group]))  # (E', B, ...)
            avail = torch.stack([sample_conditions(b.present[i], self.recipes[e].mode, gens[e])
                                 for i, e in enumerate(group)])
            if len(group) == E:
                p, buf = self.params.params, self.buffers
            else:
                sel = torch.tensor(group, device=self.device)
                p = {n: v.index_select(0, sel) for n, v in self.params.params.items()}
                buf = {n: v.index_select(0, sel) for n, v in self.buffers.items()}
            with self.recipes[0]._autocast():
                losses = self._loss(p, buf, b.feats, b.masks, avail, b.present, b.labels)
            part = losses["total"].sum()
            total = part if total is None else total + part
            if sums is not None:
                terms = torch.stack([losses[k].detach().float() for k in names], dim=1)  # (E', L)
                if len(group) == E:
                    sums += terms
                else:
                    sums.index_add_(0, sel, terms)
        self.params.zero_grad()
        total.backward()
        if len(batch) == E:
            active = self._all
        else:
            active = torch.zeros(E, dtype=torch.bool)
            active[list(batch)] = True
            active = active.to(self.device)
        self.opt.step(active)

    def fit(self) -> list[dict[str, Any]]:
        """Train every fold to ``optim.epochs``, then test each one's best checkpoint."""
        epochs = self.cfg.optim.epochs
        while True:
            members = [e for e, r in enumerate(self.recipes) if r.epoch < epochs]
            if not members:
                break
            t0 = time.perf_counter()
            losses = self._round(members)
            train_s = time.perf_counter() - t0
            for e in members:
                t1 = time.perf_counter()
                self._sync_member(e)
                self.recipes[e].end_epoch(self.recipes[e].epoch + 1, losses[e], seconds_before=train_s, t0=t1)
        return [r.test_best() for r in self.recipes]


def stack_groups(folds: Sequence[int], size: int) -> list[list[int]]:
    """``folds`` in groups of at most ``size`` (in order)."""
    folds = list(folds)
    size = max(int(size), 1)
    return [folds[i:i + size] for i in range(0, len(folds), size)]


__all__ = ["MemberAdam", "StackedFolds", "StackedParams", "stack_groups"]
