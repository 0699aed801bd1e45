"""The per-epoch diagnostics of ``fold<k>/log.csv``: what each weighted loss term sends into
the shared layers, the scale of the projections ``X_m``, and how far the reconstructions are
from the real ``X_m`` (and from a trivial reconstruction). They show whether a loss term trains
what it should and whether reconstruction earns its place (``benchmarks/diagnostics.py``
tabulates them over runs).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from cmarr.extract.base import MODALITIES
from cmarr.model import CMARRConfig

from .data import Batch

DIAG_TERMS: tuple[str, ...] = ("udcl", "spcl", "rec", "nll", "cls")

#: The diagnostic columns of ``fold<k>/log.csv`` (written by :meth:`.fold.FoldRecipe.end_epoch`,
#: before the last column ``seconds``; ``<t>`` is a loss term udcl, spcl, rec, nll, cls and
#: ``<m>`` a modality speech, text, video). An empty cell = does not apply to the model; "nan"
#: = applies, but there was nothing to measure (e.g. no validation row lacks the modality).
#:
#: - ``wloss_<t>``: the epoch's mean training loss term weighted by its Eq. 14 weight
#:   (alpha, beta, lambda_rec, 1 for L_cls, nll_weight), i.e. its share of ``loss_total``
#:   (``loss_<t>`` is the unweighted term).
#: - ``gradnorm_<t>``: L2 norm of the gradient of the *weighted* term with respect to the
#:   shared layers (:meth:`cmarr.model.CMARR.shared_parameters`: ``inp``, UMC, projection
#:   ``proj``, those trained), measured once per epoch after training on one fixed training
#:   batch (the first ``optim.batch_size`` utterances of the fold's training part, a fixed
#:   draw of training conditions), with dropout off, in float32, by one
#:   ``torch.autograd.grad`` per term; 0 = the term does not reach them (e.g. the detached
#:   likelihood, or L_rec with the default detaches). Empty where the term's weight is 0.
#: - ``x_norm_<m>``, ``x_var_<m>``: the scale of ``X_m`` (the projection, Sec. 3.2) on the
#:   validation part (inputs of the full condition, rows where ``m`` exists): mean L2 norm of a
#:   step's d-vector, and the variance of each of the d channels over rows and steps,
#:   averaged over channels.
#: - ``rec_cos_<m>``, ``rec_mse_<m>``: ``X^_m`` against ``X_m`` on validation, over the six
#:   missing conditions' rows where ``m`` exists but is not an input (each such row once per
#:   condition): cosine similarity of each step's d-vectors averaged over steps, and the mean
#:   squared error over steps and channels (Eq. 9's "mean"), both averaged over those rows.
#:   Empty for the baseline (``reconstruction=False``: ``X^_m`` is not a reconstruction).
#: - ``triv_cos_<m>``, ``triv_mse_<m>``: the same for the trivial reconstruction, the mean of
#:   the available modalities' ``X_n`` (per step) in that row.
DIAGNOSTIC_COLUMNS: tuple[str, ...] = (
    *(f"wloss_{t}" for t in DIAG_TERMS), *(f"gradnorm_{t}" for t in DIAG_TERMS),
    *(f"x_{s}_{m}" for s in ("norm", "var") for m in MODALITIES),
    *(f"{k}_{s}_{m}" for k in ("rec", "triv") for s in ("cos", "mse") for m in MODALITIES))


def term_weights(mcfg: CMARRConfig) -> dict[str, float]:
    """The Eq. 14 weight of each loss term (plus ``nll_weight``), as the model's total loss uses them."""
    return {"udcl": mcfg.alpha, "spcl": mcfg.beta, "rec": mcfg.lambda_rec, "nll": mcfg.nll_weight, "cls": 1.0}


def cell(v: float) -> float:
    """``v`` rounded to 6 significant digits, as the log writes it."""
    return float(f"{v:.6g}")


class ValDiagnostics:
    """Accumulates the validation-side diagnostics (``x_*``, ``rec_*``, ``triv_*`` of
    :data:`DIAGNOSTIC_COLUMNS`) over the batches of one :meth:`.fold.FoldRecipe.predict` pass, from
    the model's ``internals`` (no extra model call).

    The target ``X_m`` of a row is taken from the same utterance's row of the full condition
    "svt" in the same call (``X_m`` depends on modality ``m``'s input only, so it is the same
    in every row where ``m`` is an input); without "svt" among the conditions nothing is
    accumulated (NaN). Sums are kept on the device in float64 (one host copy per pass);
    the per-row statistics are computed in float32.
    """

    N_SUMS = 7  # per modality: norm sum, steps, rec cos, rec mse, triv cos, triv mse, target rows

    def __init__(self, reconstruction: bool):
        self.reconstruction = reconstruction
        self.sums = None  # (3, N_SUMS)
        self.ch_sum = self.ch_sq = None  # (3, d) channel sums and sums of squares over rows and steps

    def add(self, X: torch.Tensor, x_hat: torch.Tensor, avail: torch.Tensor, sample: torch.Tensor,
            svt_row: torch.Tensor) -> None:
        """X, x_hat (3, R, S, d): the model's internals for R stacked rows; avail (R, 3) their
        inputs; sample (R,) the utterance of each row in the batch; svt_row (B,) the row of
        each utterance under "svt" (-1 = none)."""
        X, x_hat = X.float(), x_hat.float()
        n, R, S, d = X.shape
        if self.sums is None:
            self.sums = X.new_zeros(n, self.N_SUMS, dtype=torch.float64)
            self.ch_sum = X.new_zeros(n, d, dtype=torch.float64)
            self.ch_sq = X.new_zeros(n, d, dtype=torch.float64)
        svt = svt_row[svt_row >= 0]
        a = avail.T  # (3, R)
        zero = X.new_zeros(())
        # scale of X_m: the full-condition rows where m exists
        xs, ps = X[:, svt], a[:, svt]  # (3, R', S, d), (3, R')
        xs = torch.where(ps[:, :, None, None], xs, zero).double()
        self.sums[:, 0] += xs.norm(dim=-1).sum(dim=(1, 2))
        self.sums[:, 1] += ps.sum(dim=1).double() * S
        self.ch_sum += xs.sum(dim=(1, 2))
        self.ch_sq += xs.pow(2).sum(dim=(1, 2))
        # reconstruction: rows where m is not an input but exists (an input under "svt")
        t = svt_row[sample]  # (R,)
        has_t = t >= 0
        tc = t.clamp(min=0)
        target = ~a & a[:, tc] & has_t  # (3, R)
        true = X[:, tc]  # (3, R, S, d)
        triv = torch.where(a[:, :, None, None], X, zero).sum(dim=0) / a.sum(dim=0).clamp(min=1)[:, None, None]
        for j, est in ((2, x_hat), (4, triv.expand_as(X))):
            cos = torch.nn.functional.cosine_similarity(est, true, dim=-1).mean(dim=-1)  # (3, R)
            mse = (est - true).pow(2).mean(dim=(-1, -2))  # (3, R)
            self.sums[:, j] += torch.where(target, cos, zero).double().sum(dim=1)
            self.sums[:, j + 1] += torch.where(target, mse, zero).double().sum(dim=1)
        self.sums[:, 6] += target.sum(dim=1).double()

    def columns(self) -> dict[str, Any]:
        nan = float("nan")
        out: dict[str, Any] = {}
        if self.sums is None:
            vals = [[nan] * self.N_SUMS] * len(MODALITIES)
            var = [nan] * len(MODALITIES)
        else:
            vals = self.sums.tolist()
            n = self.sums[:, 1:2].clamp(min=1)
            var = torch.where(self.sums[:, 1] > 0, (self.ch_sq / n - (self.ch_sum / n) ** 2).mean(dim=1),
                              torch.full_like(self.sums[:, 1], nan)).tolist()
        for i, m in enumerate(MODALITIES):
            v = vals[i]
            out[f"x_norm_{m}"] = cell(v[0] / v[1]) if v[1] > 0 else nan
            out[f"x_var_{m}"] = cell(var[i]) if var[i] == var[i] else nan
        for kind, j in (("rec", 2), ("triv", 4)):
            for stat, k in (("cos", 0), ("mse", 1)):
                for i, m in enumerate(MODALITIES):
                    rows = vals[i][6]
                    if kind == "rec" and not self.reconstruction:
                        out[f"{kind}_{stat}_{m}"] = ""
                    else:
                        out[f"{kind}_{stat}_{m}"] = cell(vals[i][j + k] / rows) if rows > 0 else nan
        return out


def gradient_norms(model: torch.nn.Module, b: Batch | None, available: torch.Tensor | None,
                   weights: Mapping[str, float], pooled: bool) -> dict[str, Any]:
    """``gradnorm_<t>`` of :data:`DIAGNOSTIC_COLUMNS`: the norm of the gradient each weighted
    loss term sends into ``model``'s shared layers, on batch ``b`` under ``available`` (None:
    no batch, every measured column NaN). Dropout off, float32; the model's training mode is
    restored and the global RNG is not drawn from."""
    out: dict[str, Any] = {f"gradnorm_{k}": "" if weights[k] == 0 else float("nan") for k in DIAG_TERMS}
    params = list(model.shared_parameters().values())
    if b is None or not params:
        return out
    device = params[0].device
    was = model.training
    model.eval()  # no dropout: deterministic, and the global RNG is not drawn from
    try:
        with torch.enable_grad():
            losses = model(b.feats, b.masks, available, present=b.present, labels=b.labels, validate=False,
                           pooled=pooled).losses
            terms = [k for k in DIAG_TERMS if weights[k] > 0]
            norms = []
            for i, k in enumerate(terms):
                loss = weights[k] * losses[k]
                if not loss.requires_grad:
                    norms.append(torch.zeros((), device=device))
                    continue
                grads = torch.autograd.grad(loss, params, retain_graph=i < len(terms) - 1, allow_unused=True)
                sq = [g.float().pow(2).sum() for g in grads if g is not None]
                norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=device))
    finally:
        model.train(was)
    for k, v in zip(terms, torch.stack(norms).tolist()):
        out[f"gradnorm_{k}"] = cell(v)
    return out
