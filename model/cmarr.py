"""The CM-ARR model: alignment, reconstruction and refinement (Fig. 2).

Data flow for one batch (``B`` samples, modalities ``n`` in ``MODALITIES``, ``S = seq_len``,
``d = d_model``):

1. ``R_n`` (B, T_n, D_n) -> masked adaptive pooling to S steps (``pool_to_steps``) -> a
   per-modality linear layer to width ``d`` (needed because ``D_v != D_s``).
2. Alignment (Sec. 3.1.2): the UMC gives per-step ``mu_n, log sigma_n`` (B, S, d); their masked
   means over steps are the utterance-level Gaussians compared by L_udcl (Eqs. 1-5).
3. Reconstruction (Sec. 3.2): a 1-D convolution gives ``X_n`` (B, S, d) from ``mu_n``
   (``proj_input``); the flow gives ``Z_n = F_n(X_n)`` (Eq. 6); for a modality ``m`` that is not
   available, ``Z~_m`` = mean of the available ``Z_n`` (Eq. 7; with one available modality it is
   that modality's ``Z``), ``X~_m = F_m^{-1}(Z~_m)`` (Eq. 8), ``X^_m`` = RCAN(``X~_m``); L_rec
   (Eq. 9) compares ``X^_m`` with ``X_m`` on rows where ``m`` is present in the data.
   Gradients as in the reference code (DiCMoR) by default: ``X~_m`` is detached before RCAN
   (``rec_detach_input``; the flows then learn from their likelihood only, and Eqs. 6-8 need
   one flow pass forward, on the detached ``X``, and one inverse pass without a graph), and
   the target ``X_m`` of Eq. 9 is detached (``rec_detach_target``). With
   ``proj_grad="frozen"`` the projection is not trained and ``X_n`` carries no gradient.
4. Refinement (Sec. 3.3): ``Y_m = X_m`` if available else ``X^_m``; L_spcl (SupCon) on the
   pooled ``Y_m`` of all modalities and instances; cross-modal fusion (Eqs. 10-13), pooling
   and a classifier give the logits.

A modality that is not available is never read into the logits. Input rows of a modality that
is not present are replaced by zeros with ``torch.where`` before the first layer (so NaN there
cannot reach a value or a gradient). Rows that are present but not available (training: the
true features are L_rec's targets) are selected away with ``torch.where`` wherever they meet
the available ones: in Eq. 7's mean and in ``Y_m``, which takes the reconstruction.

The per-modality layers after step 1 (UMC, projection, flow, reconstruction module) keep
separate weights per modality but are stacked along a leading modality axis and run as one
call each (:mod:`cmarr.model.grouped`): tensors inside are (3, B, S, d) in ``MODALITIES`` order.
A step at batch 16 is bound by the number of operators, not by arithmetic, so this is what
makes it fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import MODALITIES, CMARRConfig
from .flows import Flow
from .fusion import CrossModalFusion
from .grouped import GroupConv1d, from_conv, group_masked_mean, to_conv
from .losses import LOSS_NAMES, loss_cls, loss_nll, loss_rec, loss_spcl, loss_udcl, total_loss
from .pooling import pool_to_steps
from .reconstruction import ReconstructionModule
from .umc import UMC


@dataclass
class CMARROutput:
    """What :meth:`CMARR.forward` returns.

    logits: (B, num_classes).
    losses: "udcl", "spcl", "rec", "nll", "cls", "total" scalars when labels were given, else {}.
        A term whose weight is 0 in the config (e.g. "udcl" for ``no-udcl``, all but "cls"
        for the baseline) is not computed and is reported as an exact 0.
    reps: only when ``forward(..., reps=True)``, else {}: detached tensors for the t-SNE of
        Fig. 5: ``reps["real"][m]`` (B, d) pooled ``X_m``
        (NaN on rows where ``m`` is not present), ``reps["recon"][m]`` (B, d) pooled ``X^_m``
        (NaN on rows where ``m`` was available; for the baseline, the projection of the
        zero-filled input), ``reps["recon_mask"]`` (B, 3) bool = which were reconstructed
        (not available), ``reps["present_mask"]`` (B, 3) bool.
    internals: only when ``forward(..., internals=True)``, else {}: detached step-level tensors
        for diagnostics, ``internals["X"]`` (3, B, S, d) = ``X_n`` in ``MODALITIES`` order
        (zeros on rows not read), ``internals["x_hat"]`` (3, B, S, d) = ``X^_n`` (meaningful on
        rows where ``n`` is not available; for the baseline the projection of zero features).
    """

    logits: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    reps: dict = field(default_factory=dict)
    internals: dict = field(default_factory=dict)


class CMARR(nn.Module):
    """Cross-modal alignment, reconstruction and refinement (Sun et al. 2024), see module docstring.

    Choices the paper leaves open are :class:`CMARRConfig` fields; this class makes these:
    ``seq_len`` (pooling), ``proj_input`` / ``proj_kernel`` (what the 1-D convolution projects),
    ``nll_weight`` / ``nll_prior`` / ``nll_detach_input`` (flow training), ``proj_grad`` (whether
    ``X_n`` carries gradient), ``rec_reduction`` / ``rec_detach_target`` / ``rec_detach_input`` /
    ``rec_detach_output`` (Eq. 9 and what it trains), ``udcl_*`` / ``learn_ab`` / ``learn_tau`` / ``tau_min``
    (Eqs. 2-5), ``fusion_queries`` (Eqs. 10-13), ``reconstruction`` (baseline). L_spcl is
    computed on the pooled fusion inputs ``Y_m`` (all three modalities of every instance, each
    L2-normalised inside the loss). L_udcl and the flow likelihood use every modality
    ``present`` in the data (in training that includes the true features of the modalities
    withheld as inputs; they never reach the logits); L_rec targets the rows present but not
    available. Only layers that the config uses are built, so every parameter that requires
    a gradient receives one (with ``proj_grad="frozen"`` the projection, and ``inp`` when no
    UMC is built, do not require one).
    """

    # Layout of the state dict; saved with checkpoints so that a checkpoint of another layout is
    # refused with a clear message. 2: per-modality layers stacked on a leading group axis.
    STATE_FORMAT = 2

    def __init__(self, cfg: CMARRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        n = len(MODALITIES)
        # per-modality linear to the common width (D_v != D_s): the "feature extraction" head
        self.inp = nn.ModuleDict({m: nn.Linear(cfg.dims[m], d) for m in MODALITIES})
        self.use_umc = cfg.reconstruction and (cfg.uses_udcl or cfg.proj_input == "umc_mu")
        with_sigma = cfg.uses_udcl and cfg.udcl_representation == "distribution"
        if self.use_umc:  # one UMC per modality (group axis = MODALITIES)
            self.umc = UMC(d, cfg.umc_heads, cfg.umc_mlp_ratio, cfg.dropout, attention=cfg.umc_attention,
                           with_sigma=with_sigma, groups=n)
        if cfg.uses_udcl:
            ab_used = not (cfg.udcl_representation == "point" and cfg.point_similarity == "cosine")
            if cfg.learn_ab and ab_used:  # a = -exp(.): learned, it stays the negative scale Eq. 5 needs
                self.udcl_log_neg_a = nn.Parameter(torch.tensor(math.log(-float(cfg.udcl_a))))
                self.udcl_b = nn.Parameter(torch.tensor(float(cfg.udcl_b)))
            else:
                self.register_buffer("udcl_a", torch.tensor(float(cfg.udcl_a)))
                self.register_buffer("udcl_b", torch.tensor(float(cfg.udcl_b)))
            log_tau = torch.tensor(math.log(cfg.tau_init))
            if cfg.learn_tau:
                self.log_tau = nn.Parameter(log_tau)
            else:
                self.register_buffer("log_tau", log_tau)
        # the 1-D convolution of Sec. 3.2 that gives X_n, one per modality
        self.proj = GroupConv1d(n, d, d, cfg.proj_kernel, padding=cfg.proj_kernel // 2)
        if cfg.proj_grad == "frozen":  # the reference's no_grad projection: stays at its init
            self.proj.requires_grad_(False)
            if not self.use_umc:  # nothing else would train the input layers
                self.inp.requires_grad_(False)
        if cfg.reconstruction:
            self.flow = Flow(d, cfg.flow_steps, cfg.flow_hidden, cfg.flow_kernel, groups=n)
            self.rec = ReconstructionModule(d, cfg.rcan_blocks, cfg.rcan_kernel, cfg.rcan_reduction, groups=n)
            if cfg.nll_prior == "class" and cfg.nll_weight > 0:
                self.prior_mean = nn.Parameter(torch.zeros(n, cfg.num_classes, d))  # (3, classes, d)
        self.fusion = CrossModalFusion(d, cfg.fusion_heads, cfg.fusion_ff_ratio, cfg.dropout, cfg.fusion_queries)
        self.classifier = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout),
                                        nn.Linear(d, cfg.num_classes))

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The trained layers upstream of every branch: ``inp``, the UMC and the projection
        ``proj`` (those built and requiring a gradient), by name. Every loss term that reaches
        the encoders passes through them, so the gradient norm each term sends into them
        compares the terms' pull on the shared representation (the trainer's log)."""
        return {n: p for n, p in self.named_parameters()
                if n.startswith(("inp.", "umc.", "proj.")) and p.requires_grad}

    # ------------------------------------------------------------------ checks
    def udcl_scale(self) -> Tensor:
        """``a`` of Eq. 5: the fixed buffer, or ``-exp`` of the learned log-magnitude
        (``learn_ab``), so that training cannot turn the similarity into a dissimilarity."""
        if hasattr(self, "udcl_log_neg_a"):
            return -torch.exp(self.udcl_log_neg_a)
        return self.udcl_a

    def _check_inputs(self, feats: dict[str, Tensor], masks: dict[str, Tensor], available: Tensor,
                      present: Tensor | None) -> Tensor:
        n_mod = len(MODALITIES)
        if available.dtype != torch.bool or available.dim() != 2 or available.shape[1] != n_mod:
            raise ValueError(f"CMARR: available must be a bool (B, {n_mod}) tensor, "
                             f"got {available.dtype} {tuple(available.shape)}")
        B = available.shape[0]
        if present is None:
            present = available
        elif present.dtype != torch.bool or present.shape != available.shape:
            raise ValueError(f"CMARR: present must be a bool tensor shaped like available {tuple(available.shape)}, "
                             f"got {present.dtype} {tuple(present.shape)}")
        for m in MODALITIES:
            if m not in feats or m not in masks:
                raise ValueError(f"CMARR: feats and masks need modality {m!r} (fill unavailable rows with anything)")
            x, mask = feats[m], masks[m]
            if x.dim() != 3 or x.shape[0] != B or x.shape[2] != self.cfg.dims[m]:
                raise ValueError(f"CMARR: feats[{m!r}] must be (B={B}, T, {self.cfg.dims[m]}), got {tuple(x.shape)}")
            if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise ValueError(f"CMARR: masks[{m!r}] must be bool {tuple(x.shape[:2])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        return present

    # ------------------------------------------------------------------ forward
    def forward(self, feats: dict[str, Tensor], masks: dict[str, Tensor], available: Tensor,
                present: Tensor | None = None, labels: Tensor | None = None, validate: bool = True,
                pooled: bool = False, reps: bool = False, internals: bool = False) -> CMARROutput:
        """Run the model on one batch.

        Args:
            feats: modality -> (B, T_m, D_m) float, padded; raw frames or already pooled to
                ``seq_len`` steps (pooling a row of exactly ``seq_len`` valid steps is the identity).
            masks: modality -> (B, T_m) bool, True = valid frame.
            available: (B, 3) bool, the modalities given as inputs (the condition).
            present: (B, 3) bool, the modalities that exist in the data (reconstruction
                targets where not available); default ``available``. Must contain ``available``.
            labels: (B,) long or None; with labels the losses are computed.
            validate: check the values of the inputs (one host sync). A caller whose batches
                are known to be valid may skip it (a compiled step, where the sync would split
                the graph).
            pooled: the inputs are already pooled to ``seq_len`` steps (``pool_to_steps``), so
                every row's mask is all True or all False: pooling, which would be the
                identity, is skipped (checked when ``validate``).
            reps: also return the representations of Fig. 5 (``CMARROutput.reps``); off in
                training, where they would be wasted work.
            internals: also return ``X`` and ``X^`` per step (``CMARROutput.internals``; no
                extra computation, references to detached tensors).
        """
        cfg = self.cfg
        present = self._check_inputs(feats, masks, available, present)
        # true features are read where they exist (inputs, and targets / Fig. 5 references)
        read = present  # (B, 3)
        A = available.T  # (3, B) the condition, modality-major like the stacked tensors

        h, step_mask = [], []
        for i, m in enumerate(MODALITIES):
            keep = read[:, i : i + 1] & masks[m]  # (B, T_m): never read unavailable rows or padding
            x = torch.where(keep.unsqueeze(-1), feats[m], torch.zeros((), dtype=feats[m].dtype, device=feats[m].device))
            if pooled:
                if x.shape[1] != cfg.seq_len:
                    raise ValueError(f"CMARR: pooled feats[{m!r}] must have seq_len={cfg.seq_len} steps, "
                                     f"got {x.shape[1]}")
                sm = keep  # (B, S)
            else:
                x, sm = pool_to_steps(x, keep, cfg.seq_len)  # (B, S, D_m), (B, S)
            h.append(self.inp[m](x.to(self.inp[m].weight.dtype)))  # (B, S, d)
            step_mask.append(sm)
        H, M = torch.stack(h), torch.stack(step_mask)  # (3, B, S, d), (3, B, S)
        if validate:  # all input checks that need values, with one host sync
            empty = read.T & ~M[:, :, 0]  # (3, B): marked available/present without a valid frame
            checks = [("a modality marked available is not present", (available & ~present).any()),
                      ("every sample needs at least one available modality", (~available.any(dim=1)).any())]
            if pooled:
                checks.append(("pooled inputs need every row's mask all True or all False",
                               (M.any(dim=2) & ~M.all(dim=2)).any()))
            flags = torch.cat([f.view(1) for _, f in checks] + [empty.any(dim=1)]).tolist()
            for (problem, _), failed in zip(checks, flags):
                if failed:
                    raise ValueError(f"CMARR: {problem}")
            bad = [m for m, failed in zip(MODALITIES, flags[len(checks):]) if failed]
            if bad:
                raise ValueError(f"CMARR: feats{bad} have rows marked available/present without a valid frame")

        # ---- alignment (Sec. 3.1.2)
        mu = logsigma = None
        if self.use_umc:
            mu, logsigma = self.umc(H, M)  # (3, B, S, d) each (log sigma may be None)

        # ---- projection to X_n (Sec. 3.2)
        src = mu if (self.use_umc and cfg.proj_input == "umc_mu") else H
        # padding steps are zero
        src = torch.where(M.unsqueeze(-1), src, torch.zeros((), dtype=src.dtype, device=src.device))
        X = from_conv(self.proj(to_conv(src)), len(MODALITIES))  # (3, B, S, d)
        if cfg.proj_grad == "frozen":  # the reference computes it under no_grad: no gradient upstream
            X = X.detach()

        # ---- reconstruction (Eqs. 6-8) or zero-filled inputs (baseline)
        z_nll = logdet_nll = None
        if cfg.reconstruction:
            B = X.shape[1]
            if cfg.rec_detach_input:
                # Eqs. 6-8 carry no gradient (X~ is detached below): one flow pass gives Z and the
                # likelihood terms (nll_weight > 0 is guaranteed by the config)
                z_nll, logdet_nll = self.flow(X.detach() if cfg.nll_detach_input else X)  # (3, B, S, d), (3, B)
                Z = z_nll.detach()
            elif cfg.nll_weight > 0 and cfg.nll_detach_input:
                # one flow pass for Eq. 6 and for the likelihood of the detached input
                z_all, logdet_all = self.flow(torch.cat([X, X.detach()], dim=1))  # (3, 2B, S, d), (3, 2B)
                Z, z_nll, logdet_nll = z_all[:, :B], z_all[:, B:], logdet_all[:, B:]
            else:
                Z, logdet = self.flow(X)  # Eq. 6, (3, B, S, d)
                if cfg.nll_weight > 0:
                    z_nll, logdet_nll = Z, logdet
            # Eq. 7: Z~ = mean of the available Z_n. For a modality m that is not available this
            # is the mean over the other modalities; rows where m is available are discarded below.
            a = A[:, :, None, None]  # (3, B, 1, 1)
            # where, not a product: NaN * 0 is NaN
            z_avail = torch.where(a, Z, torch.zeros((), dtype=Z.dtype, device=Z.device))
            z_tilde = z_avail.sum(dim=0) / a.sum(dim=0).clamp(min=1).to(Z.dtype)  # (B, S, d)
            if cfg.rec_detach_input:  # the reference detaches the flows' reverse output
                with torch.no_grad():
                    x_tilde, _ = self.flow.inverse(z_tilde.expand_as(Z))  # Eq. 8, (3, B, S, d)
            else:
                x_tilde, _ = self.flow.inverse(z_tilde.expand_as(Z))  # Eq. 8, (3, B, S, d)
            x_hat = self.rec(x_tilde)  # (3, B, S, d)
        else:
            # baseline: an unavailable modality is a zero-filled input (MMIN protocol), i.e. the
            # same layers applied to zero features
            zeros = torch.stack([self.inp[m](H.new_zeros((1, cfg.seq_len, cfg.dims[m]))) for m in MODALITIES])
            x_hat = from_conv(self.proj(to_conv(zeros)), len(MODALITIES)).expand_as(X)  # (3, B, S, d)
            if cfg.proj_grad == "frozen":
                x_hat = x_hat.detach()
        if cfg.reconstruction and cfg.rec_detach_output:  # the reference: RCAN learns from L_rec only
            Y = torch.where(A[:, :, None, None], X, x_hat.detach())  # (3, B, S, d)
        else:
            Y = torch.where(A[:, :, None, None], X, x_hat)  # (3, B, S, d)
        Y_mask = M | ~A.unsqueeze(-1)  # (3, B, S): every step of X^_m is valid

        # ---- fusion (Eqs. 10-13) and classification
        fused = self.fusion(Y, Y_mask, available)  # (B, d)
        logits = self.classifier(fused)  # (B, num_classes)

        out = CMARROutput(logits=logits, reps=self._reps(X, x_hat, M, available, present) if reps else {},
                          internals={"X": X.detach(), "x_hat": x_hat.detach()} if internals else {})
        if labels is not None:
            out.losses = self._losses(labels, logits, mu, logsigma, X, x_hat, Y, Y_mask, M, z_nll, logdet_nll,
                                      available, present)
        return out

    # ------------------------------------------------------------------ pieces
    def _reps(self, X, x_hat, M, available, present) -> dict:
        with torch.no_grad():
            nan = torch.full((), float("nan"), dtype=X.dtype, device=X.device)  # a fill, not a host copy
            pooled = group_masked_mean(X, M)  # (3, B, d)
            pooled_hat = x_hat.mean(dim=2)  # (3, B, d), every step of X^_m is valid
            real = torch.where(present.T.unsqueeze(-1), pooled, nan)
            recon = torch.where(~available.T.unsqueeze(-1), pooled_hat, nan)
        return {"real": dict(zip(MODALITIES, real.unbind(0))), "recon": dict(zip(MODALITIES, recon.unbind(0))),
                "recon_mask": ~available, "present_mask": present}

    def _losses(self, labels, logits, mu, logsigma, X, x_hat, Y, Y_mask, M, z_nll, logdet_nll, available, present):
        cfg = self.cfg
        zero = logits.new_zeros((), dtype=torch.float32)
        losses: dict[str, Tensor] = {k: zero for k in LOSS_NAMES}
        losses["cls"] = loss_cls(logits, labels)

        if cfg.uses_udcl:  # Eqs. 1-5 over the modalities present in the data
            mu_bar = group_masked_mean(mu, M).transpose(0, 1)  # (B, 3, d)
            sigma_bar = None
            if cfg.udcl_representation == "distribution":
                sigma_bar = group_masked_mean(torch.exp(logsigma), M).transpose(0, 1)  # (B, 3, d)
            losses["udcl"] = loss_udcl(
                mu_bar, sigma_bar, present, a=self.udcl_scale(), b=self.udcl_b,
                tau=torch.exp(self.log_tau).clamp(min=cfg.tau_min),
                point_similarity=cfg.point_similarity, direction_reduction=cfg.udcl_direction_reduction,
                pair_reduction=cfg.udcl_pair_reduction)

        # Eq. 9 and the flow likelihood are averages over (modality, row) pairs: every present row
        # has all seq_len steps valid after pooling, so this equals weighting each modality's
        # mean by its number of rows
        if cfg.reconstruction and cfg.lambda_rec > 0:  # Eq. 9 on rows present but not available
            target = (present & ~available).T  # (3, B)
            x_true = X.detach() if cfg.rec_detach_target else X
            losses["rec"] = loss_rec(x_hat.flatten(0, 1), x_true.flatten(0, 1), target.flatten(), mask=M.flatten(0, 1),
                                     reduction=cfg.rec_reduction)

        if cfg.reconstruction and cfg.nll_weight > 0:  # trains the flows (open point, see CMARRConfig)
            prior = None
            if cfg.nll_prior == "class":
                prior = self.prior_mean[:, labels].flatten(0, 1).unsqueeze(1)  # (3 B, 1, d)
            losses["nll"] = loss_nll(z_nll.flatten(0, 1), logdet_nll.flatten(), present.T.flatten(), prior_mean=prior)

        if cfg.beta > 0:  # SupCon over all modalities of all instances (Sec. 3.3.1)
            pooled = group_masked_mean(Y, Y_mask).transpose(0, 1)  # (B, 3, d)
            feats = pooled.reshape(-1, pooled.shape[-1])  # (B * 3, d)
            losses["spcl"] = loss_spcl(feats, labels.repeat_interleave(len(MODALITIES)), cfg.spcl_temperature)

        losses["total"] = total_loss(losses, alpha=cfg.alpha, beta=cfg.beta, lambda_rec=cfg.lambda_rec,
                                     nll_weight=cfg.nll_weight)
        return losses
