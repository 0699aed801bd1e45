"""Speech features: frame-level hidden states of a wav2vec2-family encoder (the paper's
``R_s``, Sec. 3.1.1: wav2vec2-base).

``SpeechExtractor`` reads each utterance's wav (``cmarr.extract.audio``: mono, 16 kHz),
normalises it as the checkpoint's feature-extractor config says (wav2vec2-base:
zero mean and unit variance per utterance), and runs the checkpoint's encoder as
``AutoModel`` loads it. One row per encoder frame: ``T = floor((N - 400) / 320) + 1`` for
``N`` samples at 16 kHz with the standard convolution stack, i.e. about 50 frames/s, frame
``t`` covering samples ``[320 t, 320 t + 400)``.

**Encoders.** The architectures (``config.json`` ``model_type``) whose padding behaviour
below has been checked against their ``transformers`` code: ``wav2vec2`` (``Wav2Vec2Model``),
``hubert`` (``HubertModel``), ``wavlm`` (``WavLMModel``) and ``data2vec-audio``
(``Data2VecAudioModel``), base and large (stable-layer-norm) variants. They share the
layout this module relies on: a convolutional feature encoder
(``feature_extractor.conv_layers``), a positional convolution (``encoder.pos_conv_embed``)
and transformer blocks (``encoder.layers``). Any other ``model_type`` is refused by name
(another layout may mix padding into the features unseen), as is a checkpoint with an
adapter on top of the encoder (``add_adapter``: it changes the frame rate).

**Batching and padding.** wav2vec2-base (``feat_extract_norm == "group"``) normalises the
output of its first convolution with a GroupNorm over the whole time axis and was trained
without an attention mask, so zero padding changes every frame of a padded utterance.
Each policy below leaves an utterance's features equal to its batch-of-one features (up to
floating-point rounding; ``tests/test_speech_text.py`` and ``tests/test_speech_encoders.py``
check it):

- ``"masked"`` (default): utterances are sorted by duration and zero-padded into batches;
  the transformer gets the frame-level attention mask, whose padded keys receive zero
  weight. Every convolution of the feature encoder has no padding and a receptive field that
  ends inside the utterance, so its valid outputs never see padding; only a norm across
  time can mix it in. The rule per feature encoder:

  - group-norm (``feat_extract_norm == "group"``: wav2vec2-base, hubert-base, wavlm-base):
    the first convolution's GroupNorm statistics are taken over each utterance's own
    (unpadded) positions (``MaskedGroupNorm``), plus the attention mask;
  - layer-norm (``feat_extract_norm == "layer"``: wav2vec2-large-lv60, XLS-R, hubert-large,
    wavlm-large; and data2vec-audio, whose convolutions are always followed by a LayerNorm
    over channels): every norm is per frame, so the attention mask alone is needed.

  The positional convolution reads neighbouring frames. Each encoder zeroes the padded
  frames before it, which a batch of one's zero padding matches; where more than one layer
  reads across time, the padded frames of every intermediate output are zeroed too
  (``ZeroPaddedFrames``): the stacked positional convolutions of data2vec-audio (each adds
  a bias and a LayerNorm, so padding would not stay zero) and HuBERT's optional BatchNorm
  before its positional convolution (``conv_pos_batch_norm``). WavLM's relative position
  bias depends on the distance between two frames only (and its gate on the query frame),
  so the valid frames get the same bias at any padded length; its padded keys are masked
  like the others'.

  Since padding then changes nothing, batches are padded to lengths on a coarse
  grid (``length_buckets``) so that shapes repeat and the GPU's convolution plans are reused.
  Checked at start-up on two probe signals for the loaded model (``verify_batching``).
- ``"equal-length"``: only utterances with identical sample counts share a batch (no
  padding at all); the others run alone.
- ``"none"``: every utterance alone.

The policy is written into the store's provenance, with the model class and ``model_type``.

**Layer.** ``layer=-1`` (default) is the model's ``last_hidden_state``; ``k`` in ``1..L``
is the output of transformer block ``k`` (``-k`` counts from the end); blocks after ``k``
are not run. For wav2vec2-base (group-norm feature encoder, post-norm blocks) ``-1`` and
``L`` are the same (so for hubert-base, wavlm-base and data2vec-audio); for
stable-layer-norm models (wav2vec2-large-lv60, XLS-R, hubert-large, wavlm-large)
``last_hidden_state`` is the final LayerNorm's output, which block ``L``'s is not, so ``-1``
and ``L`` differ there (provenance ``layer_meaning`` says which was taken). Truncation
keeps block 1, which in WavLM holds the relative position embedding that every later block
reuses, so it holds for all four architectures.

**Precision.** ``dtype="float32"`` (default, every device) computes in float32 with TF32
off, also in cuDNN's convolutions, so the store's float16 rounding is the only loss.
``"float16"`` / ``"bfloat16"`` run the model under autocast (weights stay float32; GroupNorm,
LayerNorm and softmax in float32): faster on a GPU, but their error is beyond the store's
precision, so they are opt-in and recorded as ``compute_dtype`` in provenance. Measured with
wav2vec2-base / bert-base architectures (random weights): on an H100, float16 autocast
differed from float32 by up to 0.0075 (speech) and 0.0034 (text), against 0.00195 for the
store's own float16 rounding, and bfloat16 by ten times more; on a CPU, float16 autocast
changed 89 % (speech) and 72 % (text) of the float16 values the store would hold, against
about 0.5 % for float32 masked batches against batch-of-one (speech). TF32 (PyTorch's default for
cuDNN convolutions), emulated on a CPU by rounding the inputs of every matrix product and
convolution to 10 mantissa bits, changed 81 % and 67 %: hence TF32 off.
``benchmarks/extract_speech_text.py --precision [--tf32]`` prints these numbers for any model.

Legend: ``B`` utterances in a batch, ``N`` samples, ``T`` frames, ``D`` hidden width.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cmarr.extract.audio import DURATION_TOLERANCE_FRACTION, DURATION_TOLERANCE_S, RESAMPLER, AudioError, read_audio
from cmarr.extract.base import ExtractError, Extractor, Result, first_line
from cmarr.extract.hf import (
    BlockOutput,
    autocast,
    check_dtype,
    model_folder,
    model_identity,
    read_model_config,
    resolve_device,
    resolve_layer,
)

BATCHING_POLICIES = ("masked", "equal-length", "none")

# Written into provenance (so the text stays as it is: resume compares it). Batched
# arithmetic may sum in another order than a batch of one, so only "none" gives the
# batch-of-one values bit for bit; the others equal them up to float32 reordering,
# sqrt(depth) * eps32 * the utterance's largest |x|, plus one float16 step when stored
# (tests/tolerance.py): one step for values of order 1, many steps for values near zero.
_BATCHING_RULES = {
    "masked": ("utterances sorted by duration and zero-padded into batches; the first conv layer's "
               "GroupNorm statistics cover each utterance's own samples only and padded frames are "
               "masked in the transformer, so every utterance's features equal its batch-of-one "
               "features up to floating-point rounding (batched sums may round differently: a small "
               "share of the stored float16 values lie one float16 step from the batch-of-one values)"),
    "equal-length": ("only utterances with identical sample counts share a batch (no padding); "
                     "all others run alone; features equal the batch-of-one features up to "
                     "floating-point rounding (batched sums may round differently)"),
    "none": "every utterance runs alone (batch of one): the batch-of-one features themselves",
}


#: The encoders whose padding behaviour this module handles (``model_type`` -> the class
#: ``AutoModel`` gives; the module docstring says what each needs). Another
#: ``model_type`` may put padding into the features in a way nothing here checks, so it is
#: refused rather than guessed at.
SPEECH_MODEL_TYPES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel", "wavlm": "WavLMModel",
                      "data2vec-audio": "Data2VecAudioModel"}


def _unsupported_type(where: str, model_type: str) -> ExtractError:
    return ExtractError(f"{where}: cannot load the speech model: its config.json says model_type {model_type!r}; "
                        f"the speech extractor needs an audio encoder of the wav2vec2 family "
                        f"({', '.join(SPEECH_MODEL_TYPES)})")


def _check_speech_folder(folder: Path) -> None:
    """A local speech model folder must hold the config of an encoder in
    ``SPEECH_MODEL_TYPES``, weights and the feature-extractor settings
    (``preprocessor_config.json``)."""
    data = read_model_config(folder, "speech model")
    if data["model_type"] not in SPEECH_MODEL_TYPES:
        raise _unsupported_type(str(folder), str(data["model_type"]))
    if not (folder / "preprocessor_config.json").is_file():
        raise ExtractError(f"{folder}: cannot load the speech model: no preprocessor_config.json in this folder "
                           "(the feature-extractor settings of a speech checkpoint: sampling rate, normalisation)")


def feature_norm(hf_config) -> str:
    """How the feature encoder normalises: ``"group"`` (a GroupNorm over time after the
    first convolution) or ``"layer"`` (a LayerNorm over channels after every convolution).
    data2vec-audio has no ``feat_extract_norm`` setting: its convolutions are always
    layer-normed."""
    if hf_config.model_type == "data2vec-audio":
        return "layer"
    return str(getattr(hf_config, "feat_extract_norm", ""))


# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechConfig:
    """How speech features are made (defaults: the paper's wav2vec2-base, last layer).

    ``model``: hub id or local folder of an encoder in ``SPEECH_MODEL_TYPES``
    (``AutoModel.from_pretrained``), ``revision``: hub branch/tag/commit. ``layer``: -1 =
    ``last_hidden_state``, ``k`` = block ``k``.
    ``device``: ``auto`` / ``cpu`` / ``cuda[:i]``; ``dtype``: ``float32`` (default) /
    ``float16`` / ``bfloat16`` autocast (see the module docstring). ``batching``:
    see the module docstring; ``max_batch_seconds`` bounds the padded audio of one batch
    (None: 400 s on CUDA, 60 s on the CPU) and ``max_batch_size`` its utterances. Under
    ``masked``, ``length_buckets`` > 0 pads every batch to a length on a geometric grid with
    that many steps per octave (at most 1/length_buckets extra padding), so that batch shapes
    repeat and the convolution kernels chosen for a shape are reused; with 0, a batch is
    padded to its longest utterance and ``max_padding`` bounds the share of padding an
    utterance may carry. These set speed and memory, never results. ``io_workers`` threads read
    and resample audio ahead of the model, ``prefetch`` utterances at most.
    ``verify_batching`` checks the masked policy on probe signals at start-up.
    ``duration_tolerance_s`` / ``duration_tolerance_fraction``: a wav whose decoded duration
    differs from the manifest's ``end - start``, or falls short of what its own header
    declares, by more than ``max(duration_tolerance_s, duration_tolerance_fraction *
    expected)`` is a per-utterance error (truncated or wrong file), not features of part of
    the utterance; defaults 50 ms and 5 % (``cmarr.extract.audio`` says why).
    """

    model: str = "facebook/wav2vec2-base"
    revision: str | None = None
    layer: int = -1
    device: str = "auto"
    dtype: str = "float32"
    batching: str = "masked"
    max_batch_seconds: float | None = None
    max_batch_size: int = 128
    length_buckets: int = 4
    max_padding: float = 0.25
    io_workers: int = 4
    prefetch: int = 256
    verify_batching: bool = True
    duration_tolerance_s: float = DURATION_TOLERANCE_S
    duration_tolerance_fraction: float = DURATION_TOLERANCE_FRACTION


class MaskedGroupNorm(nn.Module):
    """A ``GroupNorm`` over ``(B, C, L)`` whose statistics, when ``lengths`` is set, cover
    each item's first ``lengths[b]`` positions only, so padding does not change them. It
    wraps (and shares the parameters of) the checkpoint's own GroupNorm."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.gn = gn
        self.lengths: torch.Tensor | None = None  # (B,) valid positions per item

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        if self.lengths is None:
            return self.gn(x)
        B, C, L = x.shape
        G = self.gn.num_groups
        xf = x.float().view(B, G, C // G, L)  # (B, G, C/G, L)
        valid = torch.arange(L, device=x.device)[None, :] < self.lengths[:, None]  # (B, L)
        m = valid[:, None, None, :].to(xf.dtype)  # (B, 1, 1, L)
        n = self.lengths.to(xf.dtype)[:, None, None, None] * (C // G)
        mean = (xf * m).sum(dim=(2, 3), keepdim=True) / n  # (B, G, 1, 1)
        var = (((xf - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / n
        y = ((xf - mean) * torch.rsqrt(var + self.gn.eps)).view(B, C, L)
        if self.gn.affine:
            y = y * self.gn.weight.float()[None, :, None] + self.gn.bias.float()[None, :, None]
        return y  # float32, as GroupNorm gives under autocast


class ZeroPaddedFrames:
    """Forward hooks that set the padded frames of ``(B, C, T)`` outputs to zero while
    ``valid`` is set, so that the next convolution over time reads zeros past an
    utterance's end, as the zero padding of a batch of one gives it. Used on the layers
    between the encoder's zeroing of padded frames and the last positional convolution
    (module docstring)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.valid: torch.Tensor | None = None  # (B, T) True on an utterance's own frames
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if self.valid is None:
            return None
        return torch.where(self.valid[:, None, :], output, torch.zeros((), dtype=output.dtype, device=output.device))


class SpeechExtractor(Extractor):
    """Frame features of a wav2vec2-family encoder for the ``speech`` modality (see the
    module docstring)."""

    modality = "speech"

    def __init__(self, config: SpeechConfig = SpeechConfig()):
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        if config.batching not in BATCHING_POLICIES:
            raise ExtractError(f"speech batching {config.batching!r}: expected one of {', '.join(BATCHING_POLICIES)}")
        if ((config.max_batch_seconds is not None and config.max_batch_seconds <= 0) or config.max_batch_size < 1
                or config.length_buckets < 0 or not 0.0 <= config.max_padding <= 1.0):
            raise ExtractError("speech batching: max_batch_seconds and max_batch_size must be positive, "
                               "length_buckets >= 0, max_padding within 0..1")
        if not (config.duration_tolerance_s >= 0 and config.duration_tolerance_fraction >= 0):
            raise ExtractError(f"speech duration tolerance ({config.duration_tolerance_s} s, "
                               f"{config.duration_tolerance_fraction}): both must be >= 0")
        self.config = config
        self.device = resolve_device(config.device)
        self.max_batch_seconds = (config.max_batch_seconds if config.max_batch_seconds is not None
                                  else 400.0 if self.device.startswith("cuda") else 60.0)
        self.dtype = check_dtype(config.dtype)
        self.folder = model_folder(config.model, "speech model")
        if self.folder is not None:
            _check_speech_folder(self.folder)
        source = str(self.folder) if self.folder is not None else config.model
        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(source, revision=config.revision)
        except Exception as e:  # OSError, ValueError, EnvironmentError from the hub client
            raise ExtractError(f"{config.model}: cannot load the speech feature-extractor config "
                               f"(preprocessor_config.json): {first_line(e)}") from None
        try:  # the config first: a hub model of another family is refused before its weights load
            hf = AutoConfig.from_pretrained(source, revision=config.revision)
        except Exception as e:
            raise ExtractError(f"{config.model}: cannot load the speech model's config: {first_line(e)}") from None
        if hf.model_type not in SPEECH_MODEL_TYPES:
            raise _unsupported_type(config.model, str(hf.model_type))
        if getattr(hf, "add_adapter", False):
            raise ExtractError(f"{config.model}: cannot load the speech model: its config adds an adapter on top "
                               "of the encoder (add_adapter), which changes the frame rate; use the encoder alone")
        try:
            self.model = AutoModel.from_pretrained(source, revision=config.revision)
        except Exception as e:
            raise ExtractError(f"{config.model}: cannot load a {hf.model_type} model: {first_line(e)}") from None
        if type(self.model).__name__ != SPEECH_MODEL_TYPES[hf.model_type]:  # the layout the masking was made for
            raise ExtractError(f"{config.model}: cannot load the speech model: AutoModel gave "
                               f"{type(self.model).__name__} for model_type {hf.model_type!r}, expected "
                               f"{SPEECH_MODEL_TYPES[hf.model_type]}")
        self.model.eval().to(self.device)
        hf = self.model.config
        self.model_type = str(hf.model_type)
        self.norm = feature_norm(hf)
        self.sample_rate = int(getattr(self.feature_extractor, "sampling_rate", 16_000))
        self.do_normalize = bool(getattr(self.feature_extractor, "do_normalize", False))
        self.padding_value = float(getattr(self.feature_extractor, "padding_value", 0.0))
        self.kernels = [int(k) for k in hf.conv_kernel]
        self.strides = [int(s) for s in hf.conv_stride]
        self.hop = int(np.prod(self.strides))
        self.receptive_field = 1
        for k, s in zip(reversed(self.kernels), reversed(self.strides)):
            self.receptive_field = (self.receptive_field - 1) * s + k
        self.frame_rate = self.sample_rate / self.hop
        self.dim = int(hf.hidden_size)
        self.num_layers = int(hf.num_hidden_layers)

        # Layer choice: run blocks 1..k only and keep block k's output.
        self.block = resolve_layer(config.layer, self.num_layers, config.model)
        self._capture = None
        if self.block is not None:
            self.model.encoder.layers = self.model.encoder.layers[: self.block]
            self._capture = BlockOutput(self.model.encoder.layers[self.block - 1])

        self._gn: MaskedGroupNorm | None = None
        self._zero: ZeroPaddedFrames | None = None
        if config.batching == "masked":
            self._mask_padding()
        if config.batching == "masked" and config.verify_batching:
            self._verify_batching()

    def _mask_padding(self) -> None:
        """Set up the ``masked`` policy for this encoder (module docstring): per-utterance
        statistics in a group-norm encoder's first GroupNorm, and zeroed padded frames
        between the layers that read across time in the positional embedding. A feature
        encoder whose norms are not what its ``model_type`` and ``feat_extract_norm`` say is
        refused, naming what was found."""
        name, convs = self.config.model, list(self.model.feature_extractor.conv_layers)
        norms = [getattr(c, "layer_norm", None) for c in convs]
        found = ", ".join(type(n).__name__ if n is not None else "none" for n in norms)
        if self.norm == "group":
            if not isinstance(norms[0], nn.GroupNorm) or any(n is not None for n in norms[1:]):
                raise ExtractError(f"{name}: batching 'masked' expects a GroupNorm after the first conv layer "
                                   f"and no norm after the others, found {found}; use batching 'equal-length'")
            self._gn = MaskedGroupNorm(norms[0])
            convs[0].layer_norm = self._gn
        elif self.norm == "layer":
            if not all(isinstance(n, nn.LayerNorm) for n in norms):
                raise ExtractError(f"{name}: batching 'masked' expects a LayerNorm after every conv layer, "
                                   f"found {found}; use batching 'equal-length'")
        else:
            raise ExtractError(f"{name}: feat_extract_norm {self.norm!r} is neither 'group' nor 'layer'; "
                               "use batching 'equal-length'")
        pos = self.model.encoder.pos_conv_embed
        inner = [pos.batch_norm] if getattr(pos, "batch_norm", None) is not None else []  # HuBERT's option
        inner += list(getattr(pos, "layers", [])[:-1])  # data2vec-audio's stacked convolutions
        if inner:
            self._zero = ZeroPaddedFrames(inner)

    # -- description ---------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        c = self.config
        return {
            **model_identity(c.model, c.revision, self.folder),
            "architecture": self.model_type,
            "model_class": type(self.model).__name__,
            "layer": c.layer,
            "layer_meaning": ("last_hidden_state" if self.block is None
                              else f"output of transformer block {self.block} of {self.num_layers}"),
            "dim": self.dim,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "hop_samples": self.hop,
            "receptive_field_samples": self.receptive_field,
            "normalisation": ("zero mean, unit variance per utterance" if self.do_normalize else "none"),
            "feat_extract_norm": self.norm,
            "audio": f"mono (channel mean), resampled with {RESAMPLER} when the file's rate differs",
            "compute_dtype": self.dtype,
            "batching": c.batching,
            "batching_rule": _BATCHING_RULES[c.batching],
            "duration_check": ("a wav whose decoded duration differs from the manifest's end - start by more "
                               f"than max({c.duration_tolerance_s:g} s, {c.duration_tolerance_fraction:g} x "
                               f"expected), or falls short of the frames its header declares by more than "
                               f"{c.duration_tolerance_s:g} s, is a per-utterance error"),
        }

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv stack makes from ``num_samples`` samples (0 when too short)."""
        n = num_samples
        for k, s in zip(self.kernels, self.strides):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    # -- model ---------------------------------------------------------------------------
    def _prepare(self, wave: np.ndarray) -> np.ndarray:
        """The model input for one 16 kHz waveform (normalised as the checkpoint says)."""
        if not self.do_normalize:
            return wave.astype(np.float32, copy=False)
        out = self.feature_extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")
        return np.asarray(out["input_values"][0], dtype=np.float32)

    def padded_length(self, n: int) -> int:
        """The length a batch whose longest input has ``n`` samples is padded to: ``n``, or
        under ``masked`` with ``length_buckets = k`` the next point of a grid of whole frames
        with ``k`` steps per octave."""
        k = self.config.length_buckets
        if self.config.batching != "masked" or k == 0:
            return n
        f = -(-n // self.hop)  # frames, rounded up
        step = max(1, 2 ** int(math.floor(math.log2(f))) // k)  # padding <= step / f <= 1 / k
        return max(n, -(-f // step) * step * self.hop)

    def forward(self, inputs: Sequence[np.ndarray], pad_to: int = 0) -> list[np.ndarray]:
        """Run one batch of prepared inputs ``[(N_b,)]``, zero-padded to at least ``pad_to``
        samples; returns ``[(T_b, D)]`` float32."""
        lengths = [int(len(x)) for x in inputs]
        B, N = len(inputs), max(max(lengths), pad_to)
        padded = np.full((B, N), self.padding_value, dtype=np.float32)  # (B, N)
        for b, x in enumerate(inputs):
            padded[b, : len(x)] = x
        x = torch.from_numpy(padded).to(self.device)
        kwargs = {}
        ragged = any(n != N for n in lengths)
        if ragged:
            if self.config.batching != "masked":
                raise ValueError("inputs of different lengths in one batch need the 'masked' policy")
            n = torch.tensor(lengths, device=self.device)
            kwargs["attention_mask"] = (torch.arange(N, device=self.device)[None, :] < n[:, None]).long()  # (B, N)
            if self._gn is not None:
                self._gn.lengths = (n - self.kernels[0]) // self.strides[0] + 1
            if self._zero is not None:
                frames = torch.tensor([self.num_frames(k) for k in lengths], device=self.device)
                self._zero.valid = torch.arange(self.num_frames(N), device=self.device)[None, :] < frames[:, None]
        try:
            with torch.inference_mode(), autocast(self.device, self.dtype):
                out = self.model(x, **kwargs)
                h = self._capture.pop() if self._capture is not None else out.last_hidden_state  # (B, T, D)
                h = h.float().cpu().numpy()
        finally:
            if self._gn is not None:
                self._gn.lengths = None
            if self._zero is not None:
                self._zero.valid = None
        return [h[b, : self.num_frames(n)] for b, n in enumerate(lengths)]

    def _verify_batching(self) -> None:
        """Two probe signals: batched (masked) must equal batch-of-one."""
        rng = np.random.default_rng(0)
        probes = [self._prepare(rng.standard_normal(int(s * self.sample_rate)).astype(np.float32))
                  for s in (0.61, 1.03)]
        together = self.forward(probes)
        alone = [self.forward([p])[0] for p in probes]
        tol = 1e-3 if self.dtype == "float32" else 5e-2
        for a, b in zip(together, alone):
            scale = max(1.0, float(np.abs(b).max()))
            diff = float(np.abs(a - b).max())
            if diff > tol * scale:
                raise ExtractError(f"{self.config.model}: batched features differ from batch-of-one features "
                                   f"by {diff:.3g} (tolerance {tol * scale:.3g}) with batching 'masked' in this "
                                   "transformers version; use batching 'equal-length'")

    def _batches(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[list[tuple[Any, np.ndarray]]]:
        """Group prepared inputs (in the order given, longest first) into batches the policy
        allows."""
        max_samples = self.max_batch_seconds * self.sample_rate
        bucketed = self.config.batching == "masked" and self.config.length_buckets > 0
        batch: list[tuple[Any, np.ndarray]] = []
        longest = 0
        for key, x in items:
            n = len(x)
            if batch:
                size = max(self.padded_length(max(longest, n)), 1)
                if bucketed:
                    fits = (self.padded_length(n) == self.padded_length(longest)
                            and len(batch) < min(self.config.max_batch_size, max(1, int(max_samples // size))))
                else:
                    fits = (len(batch) < self.config.max_batch_size
                            and (len(batch) + 1) * size <= max_samples
                            and min(n, longest) >= (1.0 - self.config.max_padding) * max(n, longest))
                if self.config.batching == "none" or not fits or (
                        self.config.batching == "equal-length" and n != longest):
                    yield batch
                    batch, longest = [], 0
            batch.append((key, x))
            longest = max(longest, n)
            full = self.config.max_batch_size
            if bucketed:
                full = min(full, max(1, int(max_samples // max(self.padded_length(longest), 1))))
            if len(batch) >= full or self.config.batching == "none":
                yield batch  # at once: a full batch need not wait for the next input
                batch, longest = [], 0
        if batch:
            yield batch

    def _run(self, batch: list[tuple[Any, np.ndarray]]) -> list[tuple[Any, np.ndarray | None, str | None]]:
        """Forward one batch; out of GPU memory, retry its utterances one by one."""
        try:
            feats = self.forward([x for _, x in batch], pad_to=self.padded_length(max(len(x) for _, x in batch)))
            return [(key, f, None) for (key, _), f in zip(batch, feats)]
        except torch.OutOfMemoryError:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if len(batch) == 1:
                key, x = batch[0]
                return [(key, None, f"out of {self.device} memory for {len(x) / self.sample_rate:.1f} s of audio")]
            out = []
            for item in batch:
                out.extend(self._run([item]))
            return out

    def embed(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of in-memory mono waveforms at ``self.sample_rate``: ``[(T_i, D)]`` in
        input order, batched by the configured policy (longest first)."""
        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
        out: list[np.ndarray | None] = [None] * len(waves)
        for batch in self._batches((i, self._prepare(waves[i])) for i in order):
            for i, feats, err in self._run(batch):
                if err is not None:
                    raise RuntimeError(err)
                out[i] = feats
        return out  # type: ignore[return-value]

    # -- the Extractor contract --------------------------------------------------------
    def _load(self, path: Path, expected_seconds: float | None = None) -> tuple[np.ndarray | None, str | None]:
        """The prepared input of one wav, or the reason it has none. ``expected_seconds``:
        the manifest's ``end - start`` (``None``: unknown), checked against the decoded
        duration (see ``SpeechConfig``)."""
        c = self.config
        try:
            wave = read_audio(path, self.sample_rate, expected_seconds=expected_seconds,
                              tolerance_s=c.duration_tolerance_s, tolerance_fraction=c.duration_tolerance_fraction,
                              expected_source="the manifest's end - start says")
        except AudioError as e:
            return None, f"{e.kind}: {e}"
        except Exception as e:  # a decoder bug must not stop the whole run
            return None, f"unreadable audio: {path}: {first_line(e)}"
        if len(wave) < self.receptive_field:
            return None, (f"audio too short: {path}: {len(wave)} samples at {self.sample_rate} Hz, the model "
                          f"needs at least {self.receptive_field} "
                          f"({1000 * self.receptive_field / self.sample_rate:.0f} ms)")
        return self._prepare(wave), None

    def _read_ahead(self, jobs: list[tuple[str, Path, float | None]]
                    ) -> Iterator[tuple[str, Path, np.ndarray | None, str | None]]:
        """Read (and prepare) audio in worker threads, at most ``prefetch`` ahead, in order.
        ``jobs``: ``(utterance, wav, expected seconds or None)``."""
        workers = max(1, int(self.config.io_workers))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmarr-audio") as pool:
            pending: deque = deque()
            it = iter(jobs)
            for utt, path, seconds in it:
                pending.append((utt, path, pool.submit(self._load, path, seconds)))
                if len(pending) >= max(1, self.config.prefetch):
                    break
            while pending:
                utt, path, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], nxt[1], pool.submit(self._load, nxt[1], nxt[2])))
                x, err = fut.result()
                yield utt, path, x, err

    def extract(self, rows: pd.DataFrame, root: Path) -> Iterator[Result]:
        """One ``Result`` per row: features, or the reason the utterance has none.

        Rows are processed longest first (by the manifest's ``end - start``) so that a batch
        too large for the device fails at the start, not after an hour. The same duration is
        what each wav's decoded duration is checked against (rows without ``start`` / ``end``
        get the header check only).
        """
        root = Path(root)
        jobs: list[tuple[str, Path, float | None]] = []
        for r in rows.itertuples(index=False):
            utt = str(r.utterance_id)
            wav = str(getattr(r, "wav_path", "") or "")
            if not wav:
                yield Result(utt, error="no wav file for this utterance in the manifest")
                continue
            start, end = getattr(r, "start", None), getattr(r, "end", None)
            duration = float(end) - float(start) if pd.notna(end) and pd.notna(start) else None
            jobs.append((utt, root / wav, duration))
        jobs.sort(key=lambda j: -(j[2] or 0.0))

        def prepared() -> Iterator[tuple[Any, np.ndarray]]:
            for utt, _, x, err in self._read_ahead(jobs):
                if err is not None:
                    errors.append(Result(utt, error=err))
                    continue
                yield (utt, len(x)), x

        errors: list[Result] = []
        for batch in self._batches(prepared()):
            # errors met while filling this batch come out first, in reading order
            while errors:
                yield errors.pop(0)
            for (utt, n), feats, err in self._run(batch):
                if err is not None:
                    yield Result(utt, error=err)
                else:
                    yield Result(utt, matrix=feats, meta={"frame_rate": self.frame_rate,
                                                          "audio_seconds": n / self.sample_rate})
        while errors:
            yield errors.pop(0)
