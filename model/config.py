"""Configuration of the CM-ARR model: one frozen dataclass, every open point a field.

The paper (Sun et al., ACL 2024) leaves many choices open; ``docs/method.md`` lists them.
Each one is a field below with its default, and the docstring of the code that makes the
choice names the field. ``CMARRConfig.for_variant`` gives the rows of Table 3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# Index order of the (B, 3) ``available`` / ``present`` masks everywhere in the model.
MODALITIES: tuple[str, ...] = ("speech", "text", "video")

# The seven test conditions of Table 2 (available modalities); "svt" is the full condition.
CONDITIONS: dict[str, tuple[str, ...]] = {
    "t": ("text",),
    "s": ("speech",),
    "v": ("video",),
    "vt": ("video", "text"),
    "sv": ("speech", "video"),
    "st": ("speech", "text"),
    "svt": ("speech", "video", "text"),
}

# The rows of Table 3, then "baseline-missing" (not in the paper: the baseline trained as CM-ARR is).
VARIANTS: tuple[str, ...] = ("cm-arr", "baseline", "no-udcl", "no-spcl", "no-attention", "point",
                             "baseline-missing")

_CHOICES: dict[str, tuple[Any, ...]] = {
    "variant": VARIANTS,
    "udcl_representation": ("distribution", "point"),
    "point_similarity": ("euclidean", "cosine"),
    "udcl_direction_reduction": ("sum", "mean"),
    "udcl_pair_reduction": ("sum", "mean"),
    "proj_input": ("umc_mu", "features"),
    "nll_prior": ("standard", "class"),
    "rec_reduction": ("mean", "sum"),
    "proj_grad": ("train", "frozen"),
    "fusion_queries": ("all", "missing"),
}


def _default_dims() -> dict[str, int]:
    return {"speech": 768, "text": 768, "video": 342}


@dataclass(frozen=True)
class CMARRConfig:
    """Hyper-parameters of :class:`cmarr.model.CMARR`.

    Fields, grouped by phase (defaults in brackets; "paper" = stated in the paper, otherwise
    the paper is silent and the default is this project's choice):

    Inputs
      dims [speech 768, text 768, video 342] (paper, Sec. 3.1.1): input width per modality.
      num_classes [4] (paper: ang, hap, neu, sad).
      seq_len [32]: every modality is resampled to ``seq_len`` steps by masked adaptive
        average pooling (:func:`cmarr.model.pool_to_steps`) before anything else, because
        Eq. 7 averages latents of different modalities elementwise and the paper does not
        say how their lengths are matched.
      d_model [128]: the common width ``d`` of ``X_s, X_t, X_v`` (paper: not given).
      dropout [0.1]: in the UMC MLPs, attention blocks and classifier.

    Alignment (Sec. 3.1.2, Eqs. 1-5)
      umc_heads [4], umc_mlp_ratio [4] (MAP's ratio): UMC self-attention heads, MLP width.
      umc_attention [True]: False = the "w/o attention" row of Table 3 (UMC without its
        multi-head attention).
      udcl_representation ["distribution"]: "distribution" = Gaussians compared with the
        2-Wasserstein distance (Eq. 1); "point" = the "w/ Point" row of Table 3.
      point_similarity ["euclidean"]: similarity for the point variant. "euclidean" = Eq. 5
        with the sigma term of Eq. 1 removed (only the representation changes);
        "cosine" = cosine similarity of L2-normalised points.
      udcl_a [-1/200], udcl_b [4.0] (MAP's values): Eq. 5, ``S = a * D_2W + b``.
      learn_ab [False]: learn ``a`` and ``b`` (MAP keeps them fixed); ``a`` is learned as
        ``-exp(.)`` of a parameter, so it stays negative as Eq. 5 requires.
      tau_init [0.07] (MAP): initial InfoNCE temperature; learn_tau [True] ("a learned
        temperature parameter", Sec. 3.1.2), learned as ``log tau``; tau_min [0.01]: the
        learned temperature is clamped from below (CLIP's bound on its logit scale), so the
        logits of Eqs. 3-4 cannot grow without limit.
      udcl_direction_reduction ["sum"]: the two InfoNCE directions are summed as in Eq. 2
        ("mean" = MAP's average).
      udcl_pair_reduction ["mean"]: the three pairs s-t, t-v, s-v are averaged, so that
        ``alpha`` weighs one pair's Eq. 2 loss ("sum" = add them).

    Reconstruction (Sec. 3.2, Eqs. 6-9)
      proj_input ["umc_mu"]: what the 1-D convolution projects to ``X_n``: the UMC mean
        ``mu_n`` (so the alignment shapes what is reconstructed) or "features" (the
        common-width input features, the UMC then only feeds L_udcl).
      proj_kernel [3]: kernel size of that 1-D convolution (paper: not given).
      proj_grad ["train"]: "train" = the projection and everything upstream of it learn
        from every loss that reaches ``X_n``; "frozen" = the reference code's choice
        (DiCMoR, trains/singleTask/model/dicmor.py computes its width-matching Conv1d
        projections under ``torch.no_grad()``, so they stay at their random init): the
        projection's weights are not trained and ``X_n`` is computed without gradient, so
        nothing upstream (``inp``, UMC) learns through ``X_n``; the UMC then learns from
        L_udcl only, and ``inp`` too when no UMC is built. The default departs from the
        reference because in CM-ARR the projection reads the UMC's aligned ``mu_n``
        (``proj_input="umc_mu"``): freezing it would leave the input layers and the UMC to
        L_udcl alone (and, in the baselines, which build no UMC, untrained), whereas the
        reference's projections read fixed input features, so freezing them costs nothing
        upstream. The measurement does not separate the two (``benchmarks/variants.py``, 3 seeds
        x 5 folds, UAR Avg): frozen 56.4 +- 0.3 vs train 56.7 +- 0.4 on "shared", 73.2 +- 1.6
        vs 71.6 +- 1.7 on "crossmodal" (within the spread over seeds).
      flow_steps [2]: steps of ActNorm -> invertible 1x1 convolution (LU) -> affine
        coupling per modality flow; flow_hidden [64] and flow_kernel [3]: width and
        temporal kernel of the coupling networks. (Each flow runs three times per training
        step: Eq. 6, Eq. 8 and the likelihood, so it dominates the cost.)
      nll_weight [1.0]: weight of the flow negative log-likelihood, which Eq. 14 lacks; the
        flows are trained by it, and by L_rec and L_cls through ``F^{-1}`` only when
        ``rec_detach_input`` is False. The reference (DiCMoR) trains its flows by the
        negative log-likelihood alone (bits per dimension, clamped at 0).
      nll_prior ["standard"]: prior of ``Z_n``: N(0, I), or "class" = N(mu_y, I) with a
        learned mean per class and modality (DiCMoR's class-conditional prior).
      nll_detach_input [True]: the NLL sees ``X_n`` detached, so it trains only the flows; a
        likelihood on learned inputs would otherwise reward collapsing ``X_n``.
      rcan_blocks [2]: residual channel-attention blocks in the one group of the
        reconstruction module; rcan_reduction [16] (RCAN): channel-attention squeeze ratio;
        rcan_kernel [3].
      rec_reduction ["mean"]: Eq. 9 as a mean squared error over target rows, steps and
        channels ("sum" = the Frobenius norm squared per row, averaged over target rows);
        with lambda = 10 only the mean gives a scale that does not depend on ``d``. The
        reference (DiCMoR) takes ``F.mse_loss(rec_feat, conv_feat.detach())``, also a mean
        over all elements, so "mean" with ``lambda_rec`` = 10 is ten times the reference's
        term (it averages over target rows only, the reference over its reconstructed batch).
      rec_detach_target [True]: stop the gradient into the target ``X_m`` of Eq. 9, as the
        reference does (``conv_feat.detach()``); False lets L_rec pull the target towards
        the reconstruction (an outside check measured ~5 UAR points lost that way).
      rec_detach_input [True]: the flows' inverse output ``X~_m`` (Eq. 8) is detached before
        the reconstruction module, as in the reference (DiCMoR detaches the flows' reverse
        output), so the flows learn from their likelihood only (``nll_weight`` > 0 is then
        required) and L_rec and L_cls reach the reconstruction module but not the flows or
        ``X_n`` through Eqs. 6-8. False = gradients flow through ``F^{-1}`` and ``F``.
      rec_detach_output [False]: the reconstruction ``X^_m`` is detached where it enters the
        refinement (Eqs. 10-13), so the reconstruction module learns from L_rec only, as in the
        reference (DiCMoR). Off by default, a departure from the reference that a measurement
        supports (``benchmarks/variants.py``, 3 seeds x 5 folds, UAR Avg of the six missing
        conditions): detached, 56.8 +- 0.5 on the "shared" generator (not detached 56.7 +- 0.4)
        and 69.5 +- 0.4 on "crossmodal" (71.6 +- 1.7): where a missing modality's evidence must
        be made up, letting L_cls train the reconstruction module helps.
      reconstruction [True]: False = the Table 3 baseline (missing inputs zero-filled, no
        flows, no reconstruction module).

    Refinement (Sec. 3.3, Eqs. 10-13)
      spcl_temperature [0.07] (SupCon default; paper: not given).
      fusion_queries ["all"]: which modalities act as cross-attention queries (see
        :class:`cmarr.model.fusion.CrossModalFusion`). "all": each of the three modalities
        is the query of one cross-modal block whose keys/values are the other two (three
        blocks, Sec. 3.3.2), in every condition. "missing": only the reconstructed
        modalities are queries (Eqs. 10-11 literally); in the full condition all three are.
      fusion_heads [4], fusion_ff_ratio [2]: attention heads and feed-forward width ratio.

    Objective (Eq. 14)
      alpha [1.0], beta [0.1], lambda_rec [10.0] (paper, Sec. 4.2; Sec. 4.5 reports 0.5 as
        the best beta, 0.1 is kept because 4.2 states it for all experiments).

    Training protocol (read by the trainer, not by the model)
      train_missing [True]: training samples get random missing conditions; False for the
        baseline, which "is trained on full modalities" only (Sec. 4.4).
      variant ["cm-arr"]: the Table 3 row this config was made for.
    """

    dims: Mapping[str, int] = field(default_factory=_default_dims)
    num_classes: int = 4
    seq_len: int = 32
    d_model: int = 128
    dropout: float = 0.1
    # alignment
    umc_heads: int = 4
    umc_mlp_ratio: int = 4
    umc_attention: bool = True
    udcl_representation: str = "distribution"
    point_similarity: str = "euclidean"
    udcl_a: float = -1.0 / 200.0
    udcl_b: float = 4.0
    learn_ab: bool = False
    tau_init: float = 0.07
    learn_tau: bool = True
    tau_min: float = 0.01
    udcl_direction_reduction: str = "sum"
    udcl_pair_reduction: str = "mean"
    # reconstruction
    proj_input: str = "umc_mu"
    proj_kernel: int = 3
    flow_steps: int = 2
    flow_hidden: int = 64
    flow_kernel: int = 3
    nll_weight: float = 1.0
    nll_prior: str = "standard"
    nll_detach_input: bool = True
    rcan_blocks: int = 2
    rcan_reduction: int = 16
    rcan_kernel: int = 3
    rec_reduction: str = "mean"
    rec_detach_target: bool = True
    rec_detach_input: bool = True
    rec_detach_output: bool = False
    proj_grad: str = "train"
    reconstruction: bool = True
    # refinement
    spcl_temperature: float = 0.07
    fusion_queries: str = "all"
    fusion_heads: int = 4
    fusion_ff_ratio: int = 2
    # objective (Eq. 14)
    alpha: float = 1.0
    beta: float = 0.1
    lambda_rec: float = 10.0
    # protocol
    train_missing: bool = True
    variant: str = "cm-arr"

    def __post_init__(self) -> None:
        dims = dict(self.dims)
        if set(dims) != set(MODALITIES):
            raise ValueError(f"CMARRConfig.dims: need exactly {MODALITIES}, got {sorted(dims)}")
        for name, value in dims.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CMARRConfig.dims[{name!r}]: must be a positive int, got {value!r}")
        object.__setattr__(self, "dims", dims)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CMARRConfig.{name}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("num_classes", "seq_len", "d_model", "umc_heads", "umc_mlp_ratio", "proj_kernel",
                     "flow_steps", "flow_hidden", "flow_kernel", "rcan_blocks", "rcan_reduction",
                     "rcan_kernel", "fusion_heads", "fusion_ff_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"CMARRConfig.{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.num_classes < 2:
            raise ValueError(f"CMARRConfig.num_classes: must be >= 2, got {self.num_classes}")
        if self.d_model % 2:
            raise ValueError(f"CMARRConfig.d_model: must be even (coupling halves), got {self.d_model}")
        for name in ("umc_heads", "fusion_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"CMARRConfig.{name}: must divide d_model={self.d_model}")
        for name in ("proj_kernel", "flow_kernel", "rcan_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"CMARRConfig.{name}: must be odd (same-length padding), got {getattr(self, name)}")
        if self.udcl_a >= 0:
            raise ValueError(f"CMARRConfig.udcl_a: Eq. 5 needs a negative scale, got {self.udcl_a}")
        for name in ("tau_init", "tau_min", "spcl_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CMARRConfig.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("alpha", "beta", "lambda_rec", "nll_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CMARRConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CMARRConfig.dropout: must be in [0, 1), got {self.dropout}")
        if self.reconstruction and self.rec_detach_input and self.nll_weight == 0:
            raise ValueError("CMARRConfig: rec_detach_input=True trains the flows by their likelihood only; "
                             "it needs nll_weight > 0 (or set rec_detach_input=False)")
        if not self.reconstruction and (self.alpha or self.beta or self.lambda_rec or self.nll_weight):
            # the baseline builds no UMC, flows or reconstruction module: their losses cannot be weighted
            raise ValueError("CMARRConfig: reconstruction=False (baseline) needs "
                             "alpha = beta = lambda_rec = nll_weight = 0")

    # ------------------------------------------------------------------ variants
    @property
    def uses_udcl(self) -> bool:
        """True when L_udcl is part of the objective (and the UMC sigma head is built)."""
        return self.reconstruction and self.alpha > 0

    @classmethod
    def for_variant(cls, variant: str, **overrides: Any) -> "CMARRConfig":
        """The config of one row of Table 3, then ``overrides`` on top.

        - ``cm-arr``: the defaults.
        - ``baseline``: feature extraction + cross-modal fusion only; no UMC, flows or
          reconstruction; missing inputs zero-filled; trained on full modalities
          (``train_missing=False``); only L_cls.
        - ``baseline-missing`` (not in the paper): the baseline's network and loss, trained
          under the random missing conditions CM-ARR is trained under (``train_missing=True``),
          i.e. MMIN's training protocol without its imagination module. It separates what
          reconstruction buys from what training on missing conditions buys.
        - ``no-udcl``: ``alpha = 0`` (the UMC still feeds ``X_n``; its sigma head is not built).
        - ``no-spcl``: ``beta = 0``.
        - ``no-attention``: ``umc_attention = False``.
        - ``point``: ``udcl_representation = "point"``.

        ``no-udcl`` and ``point`` need no sigma, so their UMC's mean projection reads the whole
        attention output (C channels) instead of its first half (C/2), rather than leaving
        half of the attention's output weights untrained: these two rows differ from
        ``cm-arr`` in that projection's width as well as in the loss.
        """
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        settings: dict[str, Any] = {
            "cm-arr": {},
            "baseline": {"reconstruction": False, "alpha": 0.0, "beta": 0.0, "lambda_rec": 0.0,
                         "nll_weight": 0.0, "train_missing": False},
            "baseline-missing": {"reconstruction": False, "alpha": 0.0, "beta": 0.0, "lambda_rec": 0.0,
                                 "nll_weight": 0.0, "train_missing": True},
            "no-udcl": {"alpha": 0.0},
            "no-spcl": {"beta": 0.0},
            "no-attention": {"umc_attention": False},
            "point": {"udcl_representation": "point"},
        }[variant]
        return cls(**{**settings, "variant": variant, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving beside checkpoints)."""
        out = dataclasses.asdict(self)
        out["dims"] = dict(self.dims)
        return out
