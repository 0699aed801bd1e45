"""The speech extractor on every encoder architecture it takes (wav2vec2, HuBERT, WavLM,
data2vec-audio; base and stable-layer-norm layouts): tiny random models saved with
``save_pretrained`` (``conftest.TINY_SPEECH_ENCODERS``) and loaded back through
``AutoModel`` as users' checkpoints are. Each is compared with batch-of-one features taken
straight from ``transformers``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SPEECH_ENCODERS, save_tiny_speech_encoder
from tolerance import TINY_WAV2VEC2_DEPTH, assert_float32_close, reorder_bound

from cmarr.extract.base import ExtractError
from cmarr.extract.speech import SpeechConfig, SpeechExtractor

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000

#: Terms summed into one output value, as ``tolerance.TINY_WAV2VEC2_DEPTH`` counts them,
#: plus what any variant adds on top (an upper bound for all): a LayerNorm over 32 channels
#: after each of the 7 convs (layer-norm encoders), data2vec-audio's 3 positional convs of
#: 5 taps over 8 channels per group each followed by a LayerNorm over 32, WavLM's gate
#: projection of a 16-wide head per block, the final LayerNorm of stable-layer-norm models.
TINY_ENCODER_DEPTH = TINY_WAV2VEC2_DEPTH + 7 * 32 + 3 * (5 * 8 + 32) + 2 * 16 + 32

#: variant -> (model class, feat_extract_norm in provenance, what padding needs beyond the
#: attention mask: "group" statistics, "zero" padded frames inside the positional embedding)
EXPECTED = {
    "wav2vec2": ("Wav2Vec2Model", "group", "group"),
    "wav2vec2-large": ("Wav2Vec2Model", "layer", None),
    "hubert": ("HubertModel", "group", "group"),
    "hubert-large": ("HubertModel", "layer", None),
    "hubert-bn": ("HubertModel", "group", "group+zero"),
    "wavlm": ("WavLMModel", "group", "group"),
    "wavlm-large": ("WavLMModel", "layer", None),
    "data2vec-audio": ("Data2VecAudioModel", "layer", "zero"),
}
assert set(EXPECTED) == set(TINY_SPEECH_ENCODERS)

LENGTHS = (400, 799, 8000, 12345, 16000, 23456)


def _voice(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * rng.random()) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


WAVES = [_voice(n, i) for i, n in enumerate(LENGTHS)]


def _reference(folder: Path, waves, layer: int | None = None) -> list[np.ndarray]:
    """Batch-of-one features straight from transformers, no extractor code involved."""
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    for w in waves:
        x = torch.from_numpy(fe(w, sampling_rate=SR, return_tensors="np")["input_values"])
        with torch.no_grad():
            o = model(x, output_hidden_states=layer is not None)
        h = o.last_hidden_state if layer is None else o.hidden_states[layer]
        out.append(h[0].numpy())
    return out


@pytest.fixture(scope="module", params=list(TINY_SPEECH_ENCODERS))
def variant(request, tiny_speech_encoder) -> tuple[str, Path]:
    return request.param, Path(tiny_speech_encoder(request.param))


def test_masked_batches_equal_batch_of_one(variant):
    name, folder = variant
    # one batch padded to the longest utterance, and the default: batches padded to a length grid
    ragged = SpeechExtractor(SpeechConfig(model=str(folder), device="cpu", length_buckets=0, max_padding=1.0))
    assert [len(b) for b in ragged._batches((i, w) for i, w in enumerate(WAVES))] == [len(WAVES)]
    bucketed = SpeechExtractor(SpeechConfig(model=str(folder), device="cpu"))
    ref = _reference(folder, WAVES)
    for ex in (ragged, bucketed):
        for n, b, r in zip(LENGTHS, ex.embed(WAVES), ref):
            assert b.shape == (ex.num_frames(n), 32) == ((n - 400) // 320 + 1, 32) == r.shape, (name, n)
            assert_float32_close(b, r, TINY_ENCODER_DEPTH, f"{name}, {n} samples")


def test_padding_needs_what_the_rule_says(variant):
    """Without the extractor's masking, the transformers model given the attention mask
    changes a padded utterance's features exactly where the module docstring says more is
    needed (so the test above can fail), and leaves them as they are where it says the mask
    is enough."""
    from transformers import AutoModel

    name, folder = variant
    ex = SpeechExtractor(SpeechConfig(model=str(folder), device="cpu", verify_batching=False))
    model = AutoModel.from_pretrained(folder).eval()
    long, short = ex._prepare(WAVES[-1]), ex._prepare(WAVES[2])
    x = torch.zeros(2, len(long))
    x[0], x[1, : len(short)] = torch.from_numpy(long), torch.from_numpy(short)
    mask = torch.zeros(2, len(long), dtype=torch.long)
    mask[0], mask[1, : len(short)] = 1, 1
    with torch.no_grad():
        padded = model(x, attention_mask=mask).last_hidden_state[1, : ex.num_frames(len(short))].numpy()
    ref = _reference(folder, [WAVES[2]])[0]
    if EXPECTED[name][2] is None:
        assert_float32_close(padded, ref, TINY_ENCODER_DEPTH, f"{name}: the attention mask alone")
    else:
        assert np.abs(padded - ref).max() > 0.05 * np.abs(ref).max(), name


def test_layer_one(variant):
    name, folder = variant
    ex = SpeechExtractor(SpeechConfig(model=str(folder), device="cpu", layer=1, length_buckets=0, max_padding=1.0))
    assert len(ex.model.encoder.layers) == 1
    assert ex.provenance()["layer_meaning"] == "output of transformer block 1 of 2"
    waves = WAVES[2:]
    ref = _reference(folder, waves, layer=1)
    last = _reference(folder, waves[:1])[0]
    for n, a, r in zip(LENGTHS[2:], ex.embed(waves), ref):
        assert a.shape == (ex.num_frames(n), 32)
        assert_float32_close(a, r, TINY_ENCODER_DEPTH, f"{name}, layer 1, {n} samples")
    # block 1 is not the last hidden state: taking the wrong one would fail the comparison above
    scale = float(np.abs(last).max())
    assert np.abs(ref[0] - last).max() > 100 * reorder_bound(scale, TINY_ENCODER_DEPTH)


def test_provenance_names_the_class_and_type(variant):
    name, folder = variant
    p = SpeechExtractor(SpeechConfig(model=str(folder), device="cpu", verify_batching=False)).provenance()
    model_class, norm, _ = EXPECTED[name]
    assert (p["model_class"], p["architecture"], p["feat_extract_norm"]) == (
        model_class, TINY_SPEECH_ENCODERS[name][0], norm)
    assert p["frame_rate"] == 50.0 and p["receptive_field_samples"] == 400 and p["dim"] == 32
    assert set(p["weights_sha256"]) == {"model.safetensors"}


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[2] is not None])
def test_start_up_probe_catches_missing_masking(name, tiny_speech_encoder):
    """The ``verify_batching`` probe passes on each architecture with its masking, and
    fails, naming the model, once a part of that masking is taken away."""
    folder = str(tiny_speech_encoder(name))
    ex = SpeechExtractor(SpeechConfig(model=folder, device="cpu"))  # probed at start-up
    needs = EXPECTED[name][2]
    if "group" in needs:
        ex.model.feature_extractor.conv_layers[0].layer_norm = ex._gn.gn
        ex._gn = None
    else:
        for h in ex._zero.handles:
            h.remove()
        ex._zero = None
    with pytest.raises(ExtractError) as e:
        ex._verify_batching()
    assert str(e.value).startswith(f"{folder}: batched features differ from batch-of-one features"), str(e.value)


def test_hubert_batch_norm_needs_the_zeroed_frames(tiny_speech_encoder):
    """HuBERT's BatchNorm before the positional convolution maps padded zeros to non-zero
    values: without zeroing them again the GroupNorm masking alone is not enough."""
    folder = str(tiny_speech_encoder("hubert-bn"))
    ex = SpeechExtractor(SpeechConfig(model=folder, device="cpu"))
    for h in ex._zero.handles:
        h.remove()
    ex._zero = None
    with pytest.raises(ExtractError, match="batched features differ"):
        ex._verify_batching()


def test_non_audio_and_other_family_folders_are_refused(tmp_path):
    from transformers import BertConfig, BertModel, Wav2Vec2FeatureExtractor

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert)
    Wav2Vec2FeatureExtractor().save_pretrained(bert)  # so that the model_type is what is refused
    conformer = save_tiny_speech_encoder(tmp_path / "conformer", "wav2vec2-conformer", num_conv_pos_embeddings=16)
    family = "the speech extractor needs an audio encoder of the wav2vec2 family (wav2vec2, hubert, wavlm, " \
             "data2vec-audio)"
    for folder, model_type in ((bert, "bert"), (conformer, "wav2vec2-conformer")):
        with pytest.raises(ExtractError) as e:
            SpeechExtractor(SpeechConfig(model=str(folder), device="cpu"))
        assert str(e.value) == (f"{folder}: cannot load the speech model: its config.json says model_type "
                                f"{model_type!r}; {family}")
    adapter = save_tiny_speech_encoder(tmp_path / "adapter", "wav2vec2", add_adapter=True, output_hidden_size=32)
    with pytest.raises(ExtractError, match=f"^{adapter}: cannot load the speech model: its config adds an adapter"):
        SpeechExtractor(SpeechConfig(model=str(adapter), device="cpu"))
