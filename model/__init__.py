"""cmarr.model: the CM-ARR model as pure torch modules and losses (no file I/O).

``CMARR(cfg)(feats, masks, available, present=None, labels=None)`` -> :class:`CMARROutput`;
``CMARRConfig.for_variant(name)`` gives the rows of Table 3; :func:`pool_to_steps` is the
parameter-free first step, which a trainer may run once over a whole feature store.
"""

from .cmarr import CMARR, CMARROutput
from .config import CONDITIONS, MODALITIES, VARIANTS, CMARRConfig
from .flows import ActNorm, AffineCoupling, CompositeTransform, Flow, InvertibleConv1x1LU
from .fusion import CrossModalFusion
from .losses import LOSS_NAMES, info_nce, loss_cls, loss_nll, loss_rec, loss_spcl, loss_udcl, total_loss, wasserstein2
from .pooling import pool_to_steps
from .reconstruction import ReconstructionModule
from .umc import UMC

__all__ = [
    "CMARR", "CMARROutput", "CMARRConfig", "CONDITIONS", "MODALITIES", "VARIANTS",
    "ActNorm", "AffineCoupling", "CompositeTransform", "Flow", "InvertibleConv1x1LU",
    "CrossModalFusion", "ReconstructionModule", "UMC", "pool_to_steps",
    "LOSS_NAMES", "info_nce", "loss_cls", "loss_nll", "loss_rec", "loss_spcl", "loss_udcl", "total_loss",
    "wasserstein2",
]
