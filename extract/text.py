"""Text features: token-level BERT hidden states of the transcript (the paper's ``R_t``,
Sec. 3.1.1).

One row per token of the transcript, ``D = 768`` for bert-base-uncased; the word pieces
are stored beside the matrix (meta ``tokens``), so rows can be read back as text.

Choices the paper leaves open, with the defaults taken here:

- **Markers** (``markers``): IEMOCAP transcripts carry non-speech markers in square brackets
  (``[LAUGHTER]``, ``[BREATHING]``, ``[GARBAGE]``, ``[LIPSMACK]``...). ``"remove"`` (default)
  deletes every ``[...]`` span, since they describe sounds rather than words and BERT would
  split them into ``[``, ``laughter``, ``]``; ``"keep"`` keeps each as a plain word
  (``[LAUGHTER]`` -> ``LAUGHTER``). Whitespace is collapsed afterwards. A transcript that is
  empty after the rule has no text features: a per-utterance error, never an empty matrix.
- **Special tokens** (``special_tokens``): the ``[CLS]`` and ``[SEP]`` rows are kept
  (default; the first row then summarises the utterance) or dropped.
- **Long transcripts** (``long_text``): BERT reads at most ``max_length`` (512) tokens.
  ``"windows"`` (default) cuts the word pieces into consecutive windows of
  ``max_length - 2``, encodes each window alone with its own ``[CLS]``/``[SEP]``, and
  concatenates the windows' word-piece rows (keeping the first window's ``[CLS]`` and the
  last window's ``[SEP]``). ``"error"`` records such an utterance as an error instead. No
  IEMOCAP or MSP-IMPROV transcript comes near 512 tokens.
- **Layer**: ``-1`` (default) is ``last_hidden_state``; ``k`` in ``1..L`` is the output of
  encoder block ``k`` (``-k`` counts from the end); blocks after ``k`` are not run.
- **Batching**: transcripts are sorted by length and padded with an attention mask, which
  is exact for BERT (padded keys get zero attention weight; positions are absolute), up
  to floating-point rounding (``tests/test_speech_text.py`` checks it).
- **Precision**: ``dtype="float32"`` (default) on every device; float16 / bfloat16
  autocast are opt-in, as for speech (``cmarr.extract.speech``).

Legend: ``B`` windows in a batch, ``L`` tokens per window, ``D`` hidden width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

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

MARKER_RULES = ("remove", "keep")
LONG_TEXT_RULES = ("windows", "error")
_MARKER = re.compile(r"\[([^\[\]]*)\]")
_SPACES = re.compile(r"\s+")


def apply_marker_rule(text: str, rule: str = "remove") -> str:
    """The transcript the model reads: bracketed markers removed (``"remove"``) or kept as
    plain words (``"keep"``), whitespace collapsed."""
    if rule == "remove":
        text = _MARKER.sub(" ", text)
    elif rule == "keep":
        text = _MARKER.sub(lambda m: f" {m.group(1)} ", text)
    else:
        raise ValueError(f"marker rule {rule!r}: expected one of {MARKER_RULES}")
    return _SPACES.sub(" ", text).strip()


@dataclass(frozen=True)
class TextConfig:
    """How text features are made (defaults: the paper's bert-base-uncased, last layer).

    ``model``: hub id or local folder (``AutoTokenizer`` + ``AutoModel``), ``revision``:
    hub branch/tag/commit. ``layer``, ``markers``, ``special_tokens``, ``max_length``,
    ``long_text``, ``dtype``: see the module docstring. ``device``: ``auto`` / ``cpu`` /
    ``cuda[:i]``. ``max_batch_tokens`` bounds the padded tokens of one batch and
    ``max_batch_size`` its windows (memory, not results).
    """

    model: str = "bert-base-uncased"
    revision: str | None = None
    layer: int = -1
    device: str = "auto"
    dtype: str = "float32"
    markers: str = "remove"
    special_tokens: bool = True
    max_length: int = 512
    long_text: str = "windows"
    max_batch_tokens: int = 16384
    max_batch_size: int = 512


# Files a tokenizer can be loaded from: the fast tokenizer's own file, or the vocabulary a
# fast tokenizer is converted from (WordPiece, BPE, sentencepiece).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")


def _non_text_model_kind(model_type: str) -> str | None:
    """``"speech"`` / ``"image"`` when ``transformers`` files ``model_type`` under speech
    (CTC, audio classification) or image classification models, else ``None``."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    for kind, names in (("speech", ("MODEL_FOR_CTC_MAPPING_NAMES", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES")),
                        ("image", ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",))):
        if any(model_type in getattr(auto, n, {}) for n in names):
            return kind
    return None


def _check_text_folder(folder: Path) -> None:
    """A local text model folder must hold a text model's config, weights and tokenizer
    files; a speech or image model (a wav2vec2 folder given as the text model) is named as such."""
    data = read_model_config(folder, "text model")
    kind = _non_text_model_kind(str(data["model_type"]))
    if kind is not None:
        raise ExtractError(f"{folder}: cannot load the text model: its config.json says model_type "
                           f"{data['model_type']!r}, a {kind} model; the text extractor needs a text model "
                           "(e.g. BERT) saved with its tokenizer")
    if not any(next(folder.glob(g), None) for g in _TOKENIZER_FILES):
        raise ExtractError(f"{folder}: cannot load the tokenizer: no tokenizer files in this folder "
                           f"(one of {', '.join(_TOKENIZER_FILES)}; save the tokenizer beside the model "
                           "with its save_pretrained)")


class TextExtractor(Extractor):
    """BERT token features for the ``text`` modality (see the module docstring)."""

    modality = "text"

    def __init__(self, config: TextConfig = TextConfig()):
        from transformers import AutoModel, AutoTokenizer

        if config.markers not in MARKER_RULES:
            raise ExtractError(f"text markers {config.markers!r}: expected one of {', '.join(MARKER_RULES)}")
        if config.long_text not in LONG_TEXT_RULES:
            raise ExtractError(f"text long_text {config.long_text!r}: expected one of {', '.join(LONG_TEXT_RULES)}")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = check_dtype(config.dtype)
        self.folder = model_folder(config.model, "text model")
        if self.folder is not None:
            _check_text_folder(self.folder)
        source = str(self.folder) if self.folder is not None else config.model
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
        except Exception as e:
            raise ExtractError(f"{config.model}: cannot load the tokenizer: {first_line(e)}") from None
        try:
            self.model = AutoModel.from_pretrained(source, revision=config.revision)
        except Exception as e:
            raise ExtractError(f"{config.model}: cannot load the text model: {first_line(e)}") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ExtractError(f"{config.model}: the text extractor needs a fast (Rust) tokenizer, "
                               f"got {type(self.tokenizer).__name__}")
        self.model.eval().to(self.device)
        hf = self.model.config
        self.dim = int(hf.hidden_size)
        self.num_layers = int(hf.num_hidden_layers)
        limit = int(getattr(hf, "max_position_embeddings", config.max_length))
        if not 3 <= config.max_length <= limit:
            raise ExtractError(f"{config.model}: max_length {config.max_length} outside 3..{limit} "
                               "(the model's max_position_embeddings)")
        self.block = resolve_layer(config.layer, self.num_layers, config.model)
        self._capture = None
        if self.block is not None:
            layers = self._encoder_layers()
            del layers[self.block:]
            self._capture = BlockOutput(layers[self.block - 1])

    def _encoder_layers(self):
        encoder = getattr(self.model, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ExtractError(f"{self.config.model}: cannot find the encoder blocks to pick layer "
                               f"{self.config.layer}; use layer -1")
        return layers

    # -- description ---------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        c = self.config
        tok = self.tokenizer
        return {
            **model_identity(c.model, c.revision, self.folder),
            "architecture": str(self.model.config.model_type),
            "layer": c.layer,
            "layer_meaning": ("last_hidden_state" if self.block is None
                              else f"output of encoder block {self.block} of {self.num_layers}"),
            "dim": self.dim,
            "unit": "one row per word-piece token",
            "tokenizer": {"class": type(tok).__name__, "name_or_path": str(tok.name_or_path),
                          "vocab_size": int(tok.vocab_size),
                          "do_lower_case": bool(getattr(tok, "do_lower_case", False))},
            "markers": c.markers,
            "special_tokens": c.special_tokens,
            "max_length": c.max_length,
            "long_text": c.long_text,
            "compute_dtype": self.dtype,
            "batching": "padded",
            "batching_rule": ("transcripts sorted by token count and padded with an attention mask "
                              "(exact for BERT up to floating-point rounding)"),
        }

    # -- tokens --------------------------------------------------------------------------
    def windows(self, texts: list[str]) -> list[list[tuple[list[int], list[int], list[str]]]]:
        """Per text, ``[(input_ids, special_tokens_mask, tokens)]`` of the windows that cover it.

        With a fast tokenizer, its Rust backend encodes all texts in one parallel call and its
        encodings already hold the word-piece strings; this skips the per-text conversion to
        Python dicts and back (about half of the per-utterance work of a text extraction).
        Other tokenizers go through the ``transformers`` call (same windows, same tokens)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self._windows_python(texts)
        backend.enable_truncation(self.config.max_length, stride=0)  # the rest overflows into windows
        backend.no_padding()
        out: list[list[tuple[list[int], list[int], list[str]]]] = []
        for enc in backend.encode_batch(texts, add_special_tokens=True):
            out.append([(e.ids, e.special_tokens_mask, e.tokens) for e in (enc, *enc.overflowing)])
        return out

    def _windows_python(self, texts: list[str]) -> list[list[tuple[list[int], list[int], list[str]]]]:
        out: list[list[tuple[list[int], list[int], list[str]]]] = [[] for _ in texts]
        for start in range(0, len(texts), 2048):
            enc = self.tokenizer(texts[start:start + 2048], max_length=self.config.max_length, truncation=True,
                                 stride=0, return_overflowing_tokens=True, return_special_tokens_mask=True)
            mapping = enc["overflow_to_sample_mapping"]
            for ids, special, i in zip(enc["input_ids"], enc["special_tokens_mask"], mapping):
                out[start + int(i)].append((ids, special, self.tokenizer.convert_ids_to_tokens(ids)))
        return out

    def _keep(self, windows: list[tuple[list[int], list[int], list[str]]]) -> list[np.ndarray]:
        """Per window, the row positions that become rows of the utterance's matrix."""
        if len(windows) == 1 and self.config.special_tokens:  # the usual case: every row
            return [np.arange(len(windows[0][0]))]
        keep = []
        last = len(windows) - 1
        for w, (_, special, _) in enumerate(windows):
            special = np.asarray(special, dtype=bool)
            rows = ~special
            if self.config.special_tokens:
                pos = np.flatnonzero(special)
                lead = pos[pos < np.argmax(~special)] if (~special).any() else pos[:1]
                trail = pos[pos > np.flatnonzero(~special).max()] if (~special).any() else pos[1:]
                if w == 0:
                    rows[lead] = True
                if w == last:
                    rows[trail] = True
            keep.append(np.flatnonzero(rows))
        return keep

    # -- model ---------------------------------------------------------------------------
    def forward(self, windows: list[list[int]]) -> list[np.ndarray]:
        """Hidden states ``[(L_b, D)]`` (float32) of a batch of token-id windows."""
        lengths = [len(w) for w in windows]
        B, L = len(windows), max(lengths)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((B, L), pad, dtype=np.int64)  # (B, L)
        mask = np.zeros((B, L), dtype=np.int64)  # (B, L)
        for b, w in enumerate(windows):
            ids[b, : len(w)] = w
            mask[b, : len(w)] = 1
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                             attention_mask=torch.from_numpy(mask).to(self.device))
            h = self._capture.pop() if self._capture is not None else out.last_hidden_state  # (B, L, D)
            h = h.float().cpu().numpy()
        return [h[b, :n] for b, n in enumerate(lengths)]

    def _batches(self, items: list[tuple[Any, list[int]]]) -> Iterator[list[tuple[Any, list[int]]]]:
        batch: list = []
        longest = 0
        for key, w in items:
            n = len(w)
            if batch and (len(batch) >= self.config.max_batch_size
                          or (len(batch) + 1) * max(longest, n) > self.config.max_batch_tokens):
                yield batch
                batch, longest = [], 0
            batch.append((key, w))
            longest = max(longest, n)
        if batch:
            yield batch

    def embed(self, texts: list[str]) -> list[tuple[np.ndarray, list[str]]]:
        """``[(matrix (T, D), tokens)]`` for transcripts already past the marker rule;
        raises ``ValueError`` for one that yields no tokens."""
        results = list(self._embed_many(list(enumerate(texts))))
        out: list = [None] * len(texts)
        for i, matrix, tokens, err in results:
            if err is not None:
                raise ValueError(err)
            out[i] = (matrix, tokens)
        return out

    def _embed_many(self, items: list[tuple[Any, str]]
                    ) -> Iterator[tuple[Any, np.ndarray | None, list[str] | None, str | None]]:
        plans = []  # (key, windows, keep)
        for (key, _), wins in zip(items, self.windows([text for _, text in items])):
            if not wins or all(0 not in s for _, s, _ in wins):  # only special tokens
                yield key, None, None, "transcript has no tokens for the model"
                continue
            if len(wins) > 1 and self.config.long_text == "error":
                n = sum(len(ids) - sum(s) for ids, s, _ in wins)
                yield key, None, None, (f"transcript of {n} word pieces exceeds max_length "
                                        f"{self.config.max_length} (long_text 'error')")
                continue
            plans.append((key, wins, self._keep(wins)))
        flat = [((p, w), ids) for p, (_, wins, _) in enumerate(plans) for w, (ids, _, _) in enumerate(wins)]
        flat.sort(key=lambda item: -len(item[1]))
        hidden: dict[tuple[int, int], np.ndarray] = {}
        remaining = [len(wins) for _, wins, _ in plans]
        for batch in self._batches(flat):
            for ((p, w), _), h in zip(batch, self.forward([ids for _, ids in batch])):
                hidden[(p, w)] = h
                remaining[p] -= 1
                if remaining[p] == 0:
                    key, wins, keep = plans[p]
                    if len(wins) == 1 and len(keep[0]) == len(wins[0][0]):  # the usual case: every row
                        yield key, hidden.pop((p, 0)), list(wins[0][2]), None
                        continue
                    parts = [hidden.pop((p, i))[keep[i]] for i in range(len(wins))]
                    tokens = [wins[i][2][j] for i in range(len(wins)) for j in keep[i]]
                    yield key, np.concatenate(parts, axis=0), tokens, None

    # -- the Extractor contract --------------------------------------------------------
    def extract(self, rows: pd.DataFrame, root: Path) -> Iterator[Result]:
        """One ``Result`` per row: token features of the transcript, or why there are none."""
        items = []
        for r in rows.itertuples(index=False):
            utt = str(r.utterance_id)
            raw = str(getattr(r, "transcript", "") or "")
            if not raw.strip():
                yield Result(utt, error="empty transcript in the manifest")
                continue
            text = apply_marker_rule(raw, self.config.markers)
            if not text:
                yield Result(utt, error=f"empty transcript after the marker rule '{self.config.markers}' "
                                        f"(transcript: {raw.strip()[:80]!r})")
                continue
            items.append((utt, text))
        for utt, matrix, tokens, err in self._embed_many(items):
            if err is not None:
                yield Result(utt, error=err)
            else:
                yield Result(utt, matrix=matrix, meta={"tokens": tokens})
