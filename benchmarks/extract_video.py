"""Video feature extraction speed: decode, face detection, Denseface, end to end, with the
off-the-shelf ``facenet_pytorch.MTCNN.detect`` on the same frames, and how the two detectors
agree.

    python benchmarks/extract_video.py --frames 64              # this CPU
    python benchmarks/extract_video.py --frames 4096 --batch-size 256 --device cuda [--half]

Frames: 360x480 (one IEMOCAP speaker half), a textured background with a real face photo
(scikit-image's astronaut, matplotlib's Grace Hopper) pasted at a random place and size
(face height 90-300 px), every ``--blank-every``-th frame without a face. They are written
to an MJPG avi at 30 fps and read back through the extractor's own decoder with every frame
sampled, so decode and end-to-end numbers include real decoding; ``--files`` avi files
(default 4), decoded ``--decode-workers`` at a time end to end, as the extractor does over a
corpus's many dialog videos.

Rows (frames/s; Denseface: face crops/s): decode (cv2, ``iter_clips``); detect, batched
(``BatchedMTCNN.detect``); detect, off-the-shelf (``MTCNN.detect``, same batches); crop +
Denseface (random weights: the speed does not depend on them); end to end
(``VideoExtractor.extract`` from the file: decode thread, detection, crops, Denseface).
Agreement: frames where both find a face or both find none, faces found by both, median and
minimum box IoU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from cmarr.extract.faces import BatchedMTCNN, DetectorConfig, ReferenceMTCNN, agreement
from cmarr.extract.video import VideoConfig, VideoExtractor
from cmarr.extract.video_decode import ClipFrame, ClipRequest, iter_clips

H, W = 360, 480


def photos() -> list[np.ndarray]:
    import matplotlib
    from skimage import data as skdata

    ast = skdata.astronaut()[10:240, 130:320]
    gh = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    gh = cv2.cvtColor(gh, cv2.COLOR_BGR2RGB)[40:400, 120:400]
    return [np.ascontiguousarray(ast), np.ascontiguousarray(gh)]


def make_frames(n: int, blank_every: int, seed: int) -> np.ndarray:
    """(n, 360, 480, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)
    ph = photos()
    out = np.empty((n, H, W, 3), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    for i in range(n):
        c = rng.integers(40, 220, 3)
        tex = (12 * np.sin(xx / rng.uniform(5, 30)) * np.cos(yy / rng.uniform(5, 30)))[..., None]
        out[i] = np.clip(c + tex + rng.normal(0, 4, (H, W, 1)), 0, 255)
        if blank_every and i % blank_every == blank_every - 1:
            continue
        p = ph[i % 2]
        fh = int(rng.integers(90, 300))
        fw = min(W, int(fh * p.shape[1] / p.shape[0]))
        y, x = int(rng.integers(0, H - fh + 1)), int(rng.integers(0, W - fw + 1))
        out[i, y:y + fh, x:x + fw] = cv2.resize(p, (fw, fh), interpolation=cv2.INTER_AREA)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    r = fn()
    sync(device)
    return r, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=64, help="number of 360x480 frames")
    ap.add_argument("--batch-size", type=int, default=None, help="frames per detector call (default: 32 CPU, 256 CUDA)")
    ap.add_argument("--face-batch-size", type=int, default=256)
    ap.add_argument("--blank-every", type=int, default=8, help="every k-th frame has no face")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    ap.add_argument("--half", action="store_true", help="float16 nets on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--files", type=int, default=4, help="the frames are split over this many avi files")
    ap.add_argument("--decode-workers", type=int, default=4, help="files decoded at the same time (end to end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bs = a.batch_size or (256 if device.type == "cuda" else 32)
    frames = make_frames(a.frames, a.blank_every, a.seed)
    N = len(frames)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res: dict = {"device": name,
                 "frames": N, "frame_size": [H, W], "batch_size": bs, "half": a.half,
                 "files": a.files, "decode_workers": a.decode_workers}

    with tempfile.TemporaryDirectory() as tmp:
        n_files = max(1, min(a.files, N))
        avis = []
        for k, part in enumerate(np.array_split(frames, n_files)):
            avi = Path(tmp) / f"bench{k}.avi"
            w = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (W, H))
            for f in part:
                w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            w.release()
            avis.append(avi)

        # decode, one thread: every frame sampled (sample rate = file rate)
        n_dec, t_dec = timed(lambda: sum(isinstance(e, ClipFrame) for avi in avis for e in
                                         iter_clips(avi, [ClipRequest("u", 0.0, math.inf, "full")], 30.0)), device)
        assert n_dec == N, (n_dec, N)

        cfg = DetectorConfig(half=a.half)
        fast = BatchedMTCNN(cfg, device)
        ref = ReferenceMTCNN(DetectorConfig(), device)
        warm = frames[: min(bs, N)]
        fast.detect(warm)
        ref.detect(warm)  # the same warm-up for both (the reference runs in float32 even with --half)

        def run_fast():
            ds = [fast.detect(frames[i:i + bs]) for i in range(0, N, bs)]
            return _cat(ds)

        def run_ref():
            return _cat([ref.detect(frames[i:i + bs]) for i in range(0, N, bs)])

        d_fast, t_fast = timed(run_fast, device)
        d_ref, t_ref = timed(run_ref, device)
        agr = agreement(d_fast, d_ref)

        # crops + Denseface on the faces the batched detector found
        ex = VideoExtractor(VideoConfig(allow_random_weights=True, batch_size=bs, face_batch_size=a.face_batch_size,
                                        device=str(device), half=a.half))
        from cmarr.extract.faces import crop_faces

        found_t = torch.from_numpy(d_fast.found)
        boxes_t = torch.from_numpy(d_fast.boxes)

        def run_denseface():
            n = 0
            for i in range(0, N, bs):
                idx = found_t[i:i + bs].nonzero().flatten()
                x = torch.from_numpy(frames[i:i + bs]).to(device).permute(0, 3, 1, 2).float()
                crops = crop_faces(x, boxes_t[i:i + bs][idx].to(device), idx.to(device), cfg.margin, 64)
                ex.features(crops)
                n += len(idx)
            return n

        ex.features(torch.rand(min(8, N), 1, 64, 64, device=device))  # warm-up
        n_faces, t_df = timed(run_denseface, device)

        # end to end from the file
        rows = pd.DataFrame([{"utterance_id": f"u{k}", "video_path": avi.name, "video_start": float("nan"),
                              "video_end": float("nan"), "video_half": "full"} for k, avi in enumerate(avis)])
        ex_e2e = VideoExtractor(VideoConfig(allow_random_weights=True, sample_fps=30.0, batch_size=bs,
                                            face_batch_size=a.face_batch_size, device=str(device), half=a.half,
                                            decode_workers=a.decode_workers))
        out, t_e2e = timed(lambda: {r.utterance_id: r for r in ex_e2e.extract(rows, Path(tmp))}, device)
        assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
        e2e_mask = np.concatenate([out[f"u{k}"].meta["face_mask"] for k in range(len(avis))])

    res["rows"] = {
        "decode (cv2 MJPG, 1 thread)": N / t_dec,
        "detect, batched MTCNN": N / t_fast,
        "detect, off-the-shelf MTCNN.detect": N / t_ref,
        f"crop + Denseface ({n_faces} faces)": n_faces / t_df,
        "end to end (file -> features)": N / t_e2e,
    }
    res["agreement"] = agr
    res["end_to_end_faces"] = int(e2e_mask.sum())
    res["end_to_end_matches_batched"] = bool(np.array_equal(e2e_mask, d_fast.found))
    print(f"device: {res['device']}; {N} frames {H}x{W}, detector batch {bs}, half={a.half}")
    print(f"{'stage':<40}{'frames/s':>12}")
    for k, v in res["rows"].items():
        print(f"{k:<40}{v:>12.1f}")
    print(f"speed-up of detection over off-the-shelf: {t_ref / t_fast:.2f}x"
          + (" (batched in float16, off-the-shelf in float32)" if a.half else ""))
    print(f"agreement: {agr['agree'] * 100:.2f}% of frames agree (face in both {agr['face_in_both']}, "
          f"only batched {agr['face_only_a']}, only off-the-shelf {agr['face_only_b']}); "
          f"box IoU median {agr['median_iou']:.4f}, min {agr['min_iou']:.4f}")
    print(f"end to end found faces in {res['end_to_end_faces']} frames "
          f"({'same frames' if res['end_to_end_matches_batched'] else 'DIFFERENT frames'} as the batched detector run)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


def _cat(ds):
    from cmarr.extract.faces import Detections

    return Detections(np.concatenate([d.boxes for d in ds]), np.concatenate([d.probs for d in ds]),
                      np.concatenate([d.found for d in ds]))


if __name__ == "__main__":
    main(sys.argv[1:])
