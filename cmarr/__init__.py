"""cm-arr: multimodal emotion recognition with missing modalities (CM-ARR).

The package's parts:

- :mod:`cmarr.extract`: corpus manifests, the per-modality extractors and the HDF5 feature store;
- :mod:`cmarr.model`: CM-ARR's modules and losses;
- :mod:`cmarr.pipelines`: training, evaluation and prediction;
- :mod:`cmarr.cli`: what every command shares (``--version``, the exit-code table).

``Predictor`` (trained checkpoints applied to raw clips) is imported on first use, so that
``import cmarr`` stays light.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("cm-arr")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Predictor", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Predictor", "Prediction"):
        from cmarr.pipelines import media

        return getattr(media, name)
    raise AttributeError(f"module 'cmarr' has no attribute {name!r}")
