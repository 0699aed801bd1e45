"""The demo's last stage: one of its utterances as a user would bring it, a raw mp4 clip
(the speaker's half of the dialog video over the utterance's span, with its audio as an AAC
track), predicted without a transcript by the CM-ARR checkpoint of the fold whose test
session holds it (a model that never saw the clip)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def cut_clip(corpus: Path, row: pd.Series, out: Path) -> Path:
    """``out`` (mp4): the frames of ``row``'s video span, cut to its speaker's half, and its
    wav as the audio track."""
    import cv2

    from cmarr.extract.audio import read_audio
    from cmarr.extract.video_decode import cut_half

    from .media import SR, write_clip_mp4

    cap = cv2.VideoCapture(str(corpus / row["video_path"]))
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    first, last = int(np.floor(float(row["video_start"]) * fps)), int(np.ceil(float(row["video_end"]) * fps))
    frames = []
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        for _ in range(first, last):
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cut_half(frame, str(row["video_half"])))
    finally:
        cap.release()
    if not frames:
        raise RuntimeError(f"{corpus / row['video_path']}: no frame in [{row['video_start']}, {row['video_end']}] s")
    return write_clip_mp4(out, frames, fps, read_audio(corpus / row["wav_path"], SR), SR)


def predict_demo_clip(corpus: Path, manifest: Path, run_dir: Path, fold: int, out: Path) -> dict[str, Any]:
    """Cut one test utterance of ``fold`` into ``out``/``<id>.mp4`` and predict it from the raw
    file without a transcript; returns what the report shows."""
    from cmarr.extract.corpora.manifest import read_manifest
    from cmarr.pipelines.media import Predictor

    rows = read_manifest(manifest)
    rows = rows[(rows["fold"] == fold) & (rows["video_path"] != "") & (rows["wav_path"] != "")]
    row = rows.sort_values("utterance_id").iloc[0]
    clip = cut_clip(corpus, row, out / f"{row['utterance_id']}.mp4")
    ckpt = run_dir / f"fold{fold}" / "best.pt"
    r = Predictor.from_checkpoints([ckpt], device="auto").predict_file(clip)
    return {"clip": str(clip), "utterance_id": str(row["utterance_id"]), "true_label": str(row["label"]),
            "checkpoint": str(ckpt), "command": f"cm-arr-predict --checkpoint {ckpt} --media {clip}",
            **r.to_dict()}


def clip_markdown(p: dict[str, Any]) -> str:
    """The report's section on the clip prediction."""
    probs = " | ".join(f"{p['probs'][c]:.3f}" for c in p["probs"])
    missing = ", ".join(f"{m} ({p['why'][m]})" for m in p["missing"]) or "none"
    return "\n".join([
        "## A raw clip, predicted without its transcript", "",
        f"`{p['command']}`", "",
        f"The clip `{Path(p['clip']).name}` (utterance {p['utterance_id']}, labelled `{p['true_label']}`) is the "
        f"speaker's half of the dialog video over the utterance with its audio track, {p['duration']:.2f} s; the "
        f"model is the fold whose test session holds it. Used: {', '.join(p['used'])}; reconstructed by CM-ARR: "
        f"{missing}; face in {p['face_frames']} of {p['sampled_frames']} sampled frames.", "",
        "| " + " | ".join(f"p_{c}" for c in p["probs"]) + " | prediction |",
        "|" + "---:|" * (len(p["probs"]) + 1),
        f"| {probs} | **{p['label']}** |", ""])
