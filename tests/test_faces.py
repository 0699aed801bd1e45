"""MTCNN: the batched detector against the off-the-shelf one on real face photos."""
from __future__ import annotations

import os

import cv2
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from tolerance import assert_float32_close
from torchvision.ops import batched_nms

from cmarr.extract.faces import (
    BatchedMTCNN,
    DetectorConfig,
    ReferenceMTCNN,
    _AreaCropper,
    _grouped_nms,
    _min_nms,
    agreement,
    box_iou,
)

H, W = 120, 160


def _photos() -> list[np.ndarray]:
    """Real face photos cropped to the head, RGB."""
    ast = skdata.astronaut()[10:240, 130:320]
    gh = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    assert gh is not None
    gh = cv2.cvtColor(gh, cv2.COLOR_BGR2RGB)[40:400, 120:400]
    return [np.ascontiguousarray(ast), np.ascontiguousarray(gh)]


def _frames(seed: int = 0):
    """6 frames: 4 with a face photo pasted at varying size and place, 2 blank."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    frames, truth = [], []
    for i in range(6):
        f = np.empty((H, W, 3), np.uint8)
        f[:] = rng.integers(40, 220, 3)
        if i < 4:
            p = photos[i % 2]
            fh = int(rng.integers(70, 110))
            fw = int(fh * p.shape[1] / p.shape[0])
            y, x = int(rng.integers(0, H - fh + 1)), int(rng.integers(0, W - fw + 1))
            f[y:y + fh, x:x + fw] = cv2.resize(p, (fw, fh), interpolation=cv2.INTER_AREA)
            truth.append((x, y, x + fw, y + fh))
        else:
            truth.append(None)
        frames.append(f)
    return np.stack(frames), truth


@pytest.fixture(scope="module")
def dets():
    torch.set_num_threads(2)
    frames, truth = _frames()
    cfg = DetectorConfig()
    fast = BatchedMTCNN(cfg)
    ref = ReferenceMTCNN(cfg)
    d_fast, crops = fast.detect_and_crop(frames)
    return frames, truth, d_fast, crops, ref.detect(frames)


def test_real_faces_found_blank_frames_not(dets):
    frames, truth, d_fast, _, d_ref = dets
    for d in (d_fast, d_ref):
        assert d.found.tolist() == [t is not None for t in truth]
        for box, t in zip(d.boxes, truth):
            if t is None:
                assert np.isnan(box).all()
                continue
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            # the face box lies inside the pasted photo and is a sizeable part of it
            assert t[0] <= cx <= t[2] and t[1] <= cy <= t[3]
            assert (box[2] - box[0]) > 0.3 * (t[2] - t[0])
        assert (d.probs[d.found] > 0.95).all()


def test_batched_matches_off_the_shelf(dets):
    _, _, d_fast, _, d_ref = dets
    a = agreement(d_fast, d_ref)
    assert a["agree"] == 1.0 and a["face_in_both"] == 4
    assert a["min_iou"] > 0.95, a


def test_crops(dets):
    _, _, d_fast, crops, _ = dets
    assert crops.shape == (int(d_fast.found.sum()), 1, 64, 64)
    assert float(crops.min()) >= 0.0 and float(crops.max()) <= 1.0
    assert float(crops.std()) > 0.05  # a face, not a flat patch


def test_selection_largest_vs_probability():
    """Two faces in one frame: "largest" keeps the bigger one."""
    photos = _photos()
    f = np.full((H, 2 * W, 3), 128, np.uint8)
    big = cv2.resize(photos[0], (80, 96))
    small = cv2.resize(photos[1], (50, 64))
    f[10:106, 20:100] = big
    f[30:94, 200:250] = small
    d = BatchedMTCNN(DetectorConfig(selection="largest")).detect(f[None])
    assert d.found[0] and (d.boxes[0, 0] + d.boxes[0, 2]) / 2 < 110
    dp = BatchedMTCNN(DetectorConfig(selection="probability")).detect(f[None])
    r = ReferenceMTCNN(DetectorConfig(selection="probability")).detect(f[None])
    assert dp.found[0] and box_iou(dp.boxes, r.boxes)[0] > 0.95


def test_grouped_nms_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 200
    wh = torch.rand(3000, 2, generator=g) * 40 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(3000, generator=g)
    groups = torch.sort(torch.randint(0, 50, (3000,), generator=g)).values
    ref = batched_nms(boxes, scores, groups, 0.5)
    got = _grouped_nms(boxes, scores, groups, 0.5, max_boxes=100000)
    assert sorted(ref.tolist()) == sorted(got.tolist())
    got_split = _grouped_nms(boxes, scores, groups, 0.5, max_boxes=400)  # chunked path
    assert sorted(ref.tolist()) == sorted(got_split.tolist())


def test_min_nms_equals_facenet_numpy():
    from facenet_pytorch.models.utils.detect_face import batched_nms_numpy

    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 100
    wh = torch.rand(300, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(300, generator=g)
    img = torch.randint(0, 4, (300,), generator=g)
    ref = batched_nms_numpy(boxes, scores, img, 0.7, "Min")
    got = _min_nms(boxes, scores, img, 0.7)
    assert sorted(ref.tolist()) == sorted(got.tolist())


def test_area_cropper_equals_interpolate_area():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (2, 3, 50, 70), generator=g).float()
    crop = _AreaCropper(x)
    boxes = [(0, 3, 40, 5, 60), (1, 0, 50, 0, 70), (0, 10, 17, 20, 25), (1, 7, 8, 9, 10)]
    img, y0, y1, x0, x1 = (torch.tensor(c) for c in zip(*boxes))
    for S in (24, 48):
        got = crop(img, y0, y1, x0, x1, S)
        for k, (b, a, e, c, d) in enumerate(boxes):
            ref = F.interpolate(x[b:b + 1, :, a:e, c:d], size=(S, S), mode="area")[0]
            # integer sums, exact in any order; one division each: a float32 rounding apart
            assert_float32_close(got[k], ref, 1, f"box {k}, {S} x {S}")


def test_config_validation():
    with pytest.raises(ValueError, match="selection"):
        DetectorConfig(selection="first")
    with pytest.raises(ValueError, match="min_face_size"):
        DetectorConfig(min_face_size=5)
