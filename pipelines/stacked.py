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

With ``optim.compile``, the step of all members at full batch size is compiled as one graph
(vmap traces into it); other steps run eagerly. Requires the resident pipeline (every
member's batch has the same shape); not under torchrun.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import sample_conditions


class StackedParams:
    """The parameters of ``E`` models of one architecture, stacked along a leading axis.

    All of them live in one ``(E, P)`` buffer (``self.flat``), row ``e`` holding member ``e``'s
    ``P`` parameter values; parameter ``name`` is a leaf tensor ``(E, *shape)`` viewing its
    columns, and its ``.grad`` views the same columns of a second buffer (``self.flat_grad``),
    where backward accumulates. The optimizer then works on two ``(E, P)`` tensors with a
    handful of operators, a member's factors broadcast along its row.
    """

    def __init__(self, models: Sequence[torch.nn.Module]):
        named = [dict(m.named_parameters()) for m in models]
        self.names = [n for n, p in named[0].items() if p.requires_grad]
        self.E = E = len(models)
        ref = named[0]
        device, dtype = ref[self.names[0]].device, ref[self.names[0]].dtype
        sizes = [ref[n].numel() for n in self.names]
        self.flat = torch.empty(E, sum(sizes), device=device, dtype=dtype)
        self.flat_grad = torch.zeros(E, sum(sizes), device=device, dtype=dtype)
        self.params: dict[str, Tensor] = {}
        self.slices: dict[str, tuple[int, int]] = {}
        off = 0
        with torch.no_grad():
            for n, size in zip(self.names, sizes):
                shape = (E, *ref[n].shape)
                view = self.flat[:, off:off + size].view(shape)
                view.copy_(torch.stack([d[n].detach() for d in named]))
                view.requires_grad_()
                view.grad = self.flat_grad[:, off:off + size].view(shape)  # backward accumulates here
                self.params[n] = view
                self.slices[n] = (off, size)
                off += size

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
        s = self.s
        dt = s.flat.dtype
        a = active.to(self.steps.dtype)
        self.steps += a
        col = lambda v: v.to(dt).unsqueeze(1)  # (E,) -> (E, 1), broadcast along a member's row
        g = s.flat_grad
        if self.grad_clip > 0:  # per member: torch.nn.utils.clip_grad_norm_ of that member's gradients
            norm = (g * g).sum(dim=1).sqrt()
            g = g * (self.grad_clip / (norm + 1e-6)).clamp(max=1.0).unsqueeze(1)
        if self.wd and not self.decoupled:
            g = g.add(s.flat, alpha=self.wd)
        stepped = self.steps > 0
        bc1 = torch.where(stepped, 1 - self.b1 ** self.steps, torch.ones_like(self.steps))
        bc2 = torch.where(stepped, 1 - self.b2 ** self.steps, torch.ones_like(self.steps))
        self.exp_avg.lerp_(g, col((1 - self.b1) * a))
        self.exp_avg_sq.lerp_(g * g, col((1 - self.b2) * a))
        if self.wd and self.decoupled:
            s.flat.mul_(col(1 - self.lr * self.wd * a))
        denom = (self.exp_avg_sq.sqrt() / col(bc2.sqrt())).add_(self.eps)
        s.flat.addcdiv_(self.exp_avg * col(-self.lr * a / bc1), denom)

    # ---- torch.optim.Adam's per-model state, for checkpoints ------------------------------
    def _view(self, flat: Tensor, name: str, e: int) -> Tensor:
        off, size = self.s.slices[name]
        return flat[e, off:off + size].view(self.s.params[name].shape[1:])

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


class StackedModels:
    """``E`` CM-ARR models of one configuration trained as one: :class:`StackedParams`,
    :class:`MemberAdam`, and the training losses of all of them in one vmapped call.

    ``losses(members, ...)`` takes inputs stacked along a leading member axis (E', B, ...) for
    ``members`` (indices, in order; all E is the fast path, a subset is gathered) and returns
    the model's loss terms, each (E',). ``step(total, active)`` back-propagates ``total`` and
    updates the ``active`` (E,) members.
    """

    def __init__(self, models: Sequence[torch.nn.Module], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, decoupled: bool = False, grad_clip: float = 0.0):
        from torch.func import functional_call, vmap

        self.E = len(models)
        self.params = StackedParams(models)
        # buffers equal in every model (constants, index tables) go in once, not per member: an
        # index tensor with a member axis would turn plain indexing into a gather. Parameters
        # that are not trained (CMARRConfig.proj_grad = "frozen") travel with the buffers.
        per = [dict(m.named_buffers()) | {n: p.detach() for n, p in m.named_parameters() if not p.requires_grad}
               for m in models]
        self.shared = {n: b for n, b in per[0].items() if all(torch.equal(b, d[n]) for d in per[1:])}
        self.buffers = {n: torch.stack([d[n] for d in per]) for n in per[0] if n not in self.shared}
        self.opt = MemberAdam(self.params, lr=lr, betas=betas, weight_decay=weight_decay, decoupled=decoupled,
                              grad_clip=grad_clip)
        self.skeleton = copy.deepcopy(models[0]).to("meta")  # the architecture, no storage
        self.device = self.params.flat.device

        def loss(p, b, shared, feats, masks, available, present, labels):
            out = functional_call(self.skeleton, (p, b, shared), (feats, masks, available),
                                  dict(present=present, labels=labels, pooled=True, validate=False))
            return out.losses

        self._loss = vmap(loss, in_dims=(0, 0, None, 0, 0, 0, 0, 0), randomness="different")
        self._all = torch.ones(self.E, dtype=torch.bool, device=self.device)

    def train(self, mode: bool = True) -> None:
        self.skeleton.train(mode)

    def losses(self, members: Sequence[int], feats, masks, available, present, labels) -> dict[str, Tensor]:
        if len(members) == self.E:
            p, buf = self.params.params, self.buffers
        else:
            sel = torch.tensor(list(members), device=self.device)
            p = {n: v.index_select(0, sel) for n, v in self.params.params.items()}
            buf = {n: v.index_select(0, sel) for n, v in self.buffers.items()}
        return self._loss(p, buf, self.shared, feats, masks, available, present, labels)

    def all_losses(self, feats, masks, available, present, labels) -> dict[str, Tensor]:
        """``losses`` of every member: the function ``torch.compile`` takes (one graph, forward
        and backward, for the usual step; the optimizer stays outside)."""
        return self._loss(self.params.params, self.buffers, self.shared, feats, masks, available, present, labels)

    def step(self, total: Tensor, active: Sequence[int]) -> None:
        self.params.zero_grad()
        with warnings.catch_warnings():
            # the gradients are views of one (E, P) buffer, on purpose (see StackedParams);
            # autograd accumulates into them in place and notes that they are not dense
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            total.backward()
        if len(active) == self.E:
            mask = self._all
        else:
            mask = torch.zeros(self.E, dtype=torch.bool)
            mask[list(active)] = True
            mask = mask.to(self.device)
        self.opt.step(mask)


class StackedFolds:
    """Train the folds of ``recipes`` (set up, each possibly resumed) together.

    Each round trains every unfinished fold for its own next epoch in lockstep, then each fold
    goes through :meth:`FoldRecipe.end_epoch` (validation, selection, checkpoints, log) on its
    own; when all are done, each tests its best checkpoint.
    """

    def __init__(self, recipes: Sequence[Any]):
        self.recipes = list(recipes)
        r0 = self.recipes[0]
        if any(r.pipeline != "resident" for r in self.recipes):
            raise ValueError("stacked folds need data.pipeline = resident")
        self.cfg = r0.cfg
        self.device = r0.device
        o = self.cfg.optim
        self.models = StackedModels([r.model for r in self.recipes], lr=o.lr, betas=tuple(o.betas),
                                    weight_decay=o.weight_decay, decoupled=o.optimizer == "adamw",
                                    grad_clip=o.grad_clip)
        self.params, self.opt = self.models.params, self.models.opt
        for e, r in enumerate(self.recipes):
            self.opt.import_member(e, r.optimizer)
        # optim.compile as for one fold: the step of all members at full batch size is one
        # compiled graph (with compile_mode reduce-overhead, replayed as a CUDA graph); the
        # other steps (an epoch's last, smaller batches) run eagerly
        self.compiled = None
        self.compiled_steps = 0
        if r0.compiled is not r0.net:
            from .train import compile_with

            self.compiled = compile_with(self.models.all_losses, o)

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
        self.models.train()
        for r in self.recipes:
            r.model.train()

    def step(self, batch: dict[int, Tensor], gens: dict[int, torch.Generator], sums: Tensor | None = None) -> None:
        """One optimisation step of the members in ``batch`` (member -> store rows of its
        batch); ``sums`` (E, losses) accumulates their loss terms."""
        from cmarr.model import LOSS_NAMES

        names = (*LOSS_NAMES, "total")
        groups: dict[int, list[int]] = {}
        for e, r in batch.items():
            groups.setdefault(len(r), []).append(e)
        total = None
        for group in groups.values():
            b = self.recipes[0].res_full.batch(torch.stack([batch[e] for e in group]))  # (E', B, ...)
            avail = torch.stack([sample_conditions(b.present[i], self.recipes[e].mode, gens[e])
                                 for i, e in enumerate(group)])
            full = len(group) == self.models.E and len(batch[group[0]]) == self.cfg.optim.batch_size
            with self.recipes[0]._autocast():
                if full and self.compiled is not None:
                    if self.cfg.optim.compile_mode == "reduce-overhead":
                        torch.compiler.cudagraph_mark_step_begin()
                    losses = self.compiled(b.feats, b.masks, avail, b.present, b.labels)
                    self.compiled_steps += 1
                else:
                    losses = self.models.losses(group, b.feats, b.masks, avail, b.present, b.labels)
            part = losses["total"].sum()
            total = part if total is None else total + part
            if sums is not None:
                terms = torch.stack([losses[k].detach().float() for k in names], dim=1)  # (E', L)
                if len(group) == self.models.E:
                    sums += terms
                else:
                    sums.index_add_(0, torch.tensor(group, device=self.device), terms)
        self.models.step(total, list(batch))

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
                # the log's seconds: this fold's equal share of the shared training time, plus its own
                # evaluation and checkpoints (so that the folds' seconds add up to the wall time)
                self.recipes[e].end_epoch(self.recipes[e].epoch + 1, losses[e], seconds_before=train_s / len(members),
                                          t0=t1)
        return [r.test_best() for r in self.recipes]


def stack_groups(folds: Sequence[int], size: int) -> list[list[int]]:
    """``folds`` in groups of at most ``size`` (in order)."""
    folds = list(folds)
    size = max(int(size), 1)
    return [folds[i:i + size] for i in range(0, len(folds), size)]


__all__ = ["MemberAdam", "StackedFolds", "StackedModels", "StackedParams", "stack_groups"]
