"""Face detection (MTCNN) and the 64x64 grayscale face crops that Denseface reads.

Two detectors share one config and one output type:

- ``BatchedMTCNN``: facenet-pytorch's PNet/RNet/ONet with their bundled weights, driven by
  a pipeline of its own that works on a whole batch of frames on the device: every pyramid
  scale of every frame goes through PNet, the candidate cells of all scales and frames are
  found with one ``nonzero``, non-maximum suppression runs once per stage for all frames
  (``torchvision.ops.nms`` with one coordinate offset per group, the trick inside
  ``torchvision.ops.batched_nms``), the RNet/ONet inputs of all candidates are cut out at
  once from a summed-area table (exact area resampling, the same as the per-box
  ``interpolate(mode="area")`` of facenet-pytorch), and the one face per frame is chosen on
  the device. The host waits on the device a fixed number of times per batch (about
  fifteen: each ``nonzero``, boolean mask and NMS call), never per frame or per box.
- ``ReferenceMTCNN``: a thin wrapper over the off-the-shelf ``facenet_pytorch.MTCNN.detect``,
  for comparison (``benchmarks/extract_video.py``, tests).

The stages follow facenet-pytorch 2.5.3's ``detect_face`` step for step (thresholds,
pyramid, regression, squaring, clipping of crops to the frame, the final "Min"-overlap
NMS), so that both find the same faces with the same boxes.

Legend: ``B`` frames, ``H x W`` frame size, ``K`` candidate boxes, ``S`` crop side.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

SELECTIONS = ("largest", "probability")


@dataclass(frozen=True)
class DetectorConfig:
    """MTCNN settings and the face crop.

    - ``min_face_size`` (px), ``thresholds`` (PNet, RNet, ONet), ``factor`` (pyramid step):
      facenet-pytorch's defaults 20, (0.6, 0.7, 0.7), 0.709.
    - ``selection``: which face a frame keeps when MTCNN finds several: ``"largest"``
      (default: the speaker is the nearest face; facenet-pytorch's default too) or
      ``"probability"`` (the most probable).
    - ``margin``: fraction of the (squared) box side added on each side before cropping
      (default 0.1, so the crop holds the whole face with a little forehead and chin, as the
      FER2013 images do). The crop is clipped to the frame.
    - ``crop_size``: side of the grayscale crop Denseface reads (64).
    - ``half``: run the three nets in float16 (CUDA only; default False: agreement with the
      float32 reference is what ``benchmarks/extract_video.py`` measures before it is used).
    - ``max_nms_boxes``: at most this many boxes go through one NMS call (the GPU kernel
      holds a K x K/64 bit mask), larger candidate sets are split by frame.
    """

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    selection: str = "largest"
    margin: float = 0.1
    crop_size: int = 64
    half: bool = False
    max_nms_boxes: int = 16384

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 (PNet's window), got {self.min_face_size}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must lie in (0, 1), got {self.factor}")


@dataclass
class Detections:
    """One face (or none) per frame. ``boxes`` (B, 4) x1, y1, x2, y2 in pixels (NaN where no
    face), ``probs`` (B,) (NaN where none), ``found`` (B,) bool."""

    boxes: np.ndarray
    probs: np.ndarray
    found: np.ndarray


def _as_batch(frames: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 RGB frames (B, H, W, 3) -> float (B, 3, H, W) on ``device``, values 0..255."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (B, H, W, 3) RGB, got shape {tuple(frames.shape)}")
    return frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()


def _grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float,
                 max_boxes: int) -> torch.Tensor:
    """IoU NMS done separately within each group, for all groups in one call: each group's
    boxes are shifted by their own offset so that no two groups overlap (the coordinate
    trick of ``torchvision.ops.batched_nms``, called directly because that function falls
    back to one call per group above 4,000 boxes on the CPU / 20,000 on the GPU). Float64,
    so that the offsets do not eat the coordinates' precision. ``groups`` must be sorted
    ascending (true here: candidates come frame by frame); above ``max_boxes`` the set is
    split at group boundaries. Returns kept indices, sorted by decreasing score per chunk."""
    K = boxes.shape[0]
    if K == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    b = boxes.double()
    if K <= max_boxes:
        off = groups.double() * (b.max() + 1.0)
        return nms(b + off[:, None], scores.double(), iou)
    # Split into chunks of whole groups: one host read of the group sizes.
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    counts = counts.tolist()
    keep, start, size = [], 0, 0
    bounds = []
    for c in counts:
        if size and size + c > max_boxes:
            bounds.append((start, start + size))
            start, size = start + size, 0
        size += c
    bounds.append((start, start + size))
    for s, e in bounds:
        bb, gg = b[s:e], groups[s:e].double()
        off = gg * (bb.max() + 1.0)
        keep.append(nms(bb + off[:, None], scores[s:e].double(), iou) + s)
    return torch.cat(keep)


def _min_nms(boxes: torch.Tensor, scores: torch.Tensor, img: torch.Tensor, thr: float) -> torch.Tensor:
    """Greedy NMS with overlap = intersection / smaller area ("Min", facenet-pytorch's last
    stage), for all frames at once. ``S[i, j]``: higher-scored box i would suppress j. The
    greedy answer ``keep[j] = not any(keep[i] & S[i, j])`` is reached by iterating that rule
    from all-kept: after t rounds the first t boxes are final, and it stops as soon as
    nothing changes (a round or two in practice). Returns kept indices by decreasing score."""
    K = boxes.shape[0]
    if K == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    b, g = boxes[order].double(), img[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # (K,)
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0]) + 1).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1]) + 1).clamp(min=0)
    overlap = w * h / torch.minimum(area[:, None], area[None, :])  # (K, K)
    S = (overlap > thr) & (g[:, None] == g[None, :]) & torch.ones(K, K, dtype=torch.bool, device=b.device).triu(1)
    keep = torch.ones(K, dtype=torch.bool, device=b.device)
    for _ in range(K):
        new = ~(S & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def _rerec(b: torch.Tensor) -> torch.Tensor:
    """Square boxes around their centres (side = the longer side)."""
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    l = torch.maximum(w, h)
    x1 = b[:, 0] + w * 0.5 - l * 0.5
    y1 = b[:, 1] + h * 0.5 - l * 0.5
    return torch.stack([x1, y1, x1 + l, y1 + l], dim=1)


def _bbreg(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply the nets' box regression (offsets in units of the box side + 1)."""
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    return b + reg * torch.stack([w, h, w, h], dim=1)


class _AreaCropper:
    """Cuts boxes out of a batch of frames and area-resamples each to S x S, all boxes at
    once. A summed-area table (int64 on CPU, int32 on GPU: 255 * H * W fits) gives every output cell's
    sum with four gathers; cell ``i`` of a crop of height ``h`` covers rows
    ``floor(i*h/S) .. ceil((i+1)*h/S)`` exactly as ``adaptive_avg_pool2d`` (what
    ``interpolate(mode="area")`` is) does."""

    def __init__(self, frames_u8: torch.Tensor):
        # frames_u8: (B, 3, H, W) float holding integers 0..255
        B, C, H, W = frames_u8.shape
        dt = torch.int32 if frames_u8.is_cuda else torch.int64
        sat = torch.zeros(B, H + 1, W + 1, C, dtype=dt, device=frames_u8.device)
        x = frames_u8.round().to(dt).permute(0, 2, 3, 1)  # (B, H, W, 3)
        sat[:, 1:, 1:] = x.cumsum(1, dtype=dt).cumsum(2, dtype=dt)
        self.sat = sat  # (B, H+1, W+1, 3)

    def __call__(self, img: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor,
                 x1: torch.Tensor, S: int) -> torch.Tensor:
        """Crop rows y0..y1-1, columns x0..x1-1 of frame ``img`` (all (K,) long) -> (K, 3, S, S) float."""
        i = torch.arange(S, device=img.device)
        hk, wk = (y1 - y0)[:, None], (x1 - x0)[:, None]  # (K, 1)
        rs = y0[:, None] + (i * hk) // S  # (K, S)
        re = y0[:, None] + ((i + 1) * hk + S - 1) // S
        cs = x0[:, None] + (i * wk) // S
        ce = x0[:, None] + ((i + 1) * wk + S - 1) // S
        bi = img[:, None, None]
        total = (self.sat[bi, re[:, :, None], ce[:, None, :]] - self.sat[bi, rs[:, :, None], ce[:, None, :]]
                 - self.sat[bi, re[:, :, None], cs[:, None, :]] + self.sat[bi, rs[:, :, None], cs[:, None, :]])
        n = ((re - rs)[:, :, None] * (ce - cs)[:, None, :]).unsqueeze(-1)  # (K, S, S, 1)
        return (total.float() / n.float()).permute(0, 3, 1, 2)  # (K, 3, S, S)


def _pad(b: torch.Tensor, w: int, h: int):
    """facenet-pytorch's ``pad``: truncate to int, clip to the frame (1-based), and return the
    0-based crop bounds plus which boxes are non-empty."""
    b = b.trunc().long()
    x = b[:, 0].clamp(min=1)
    y = b[:, 1].clamp(min=1)
    ex = b[:, 2].clamp(max=w)
    ey = b[:, 3].clamp(max=h)
    valid = (ey > y - 1) & (ex > x - 1)
    return y - 1, ey, x - 1, ex, valid


class BatchedMTCNN:
    """MTCNN over a batch of equal-size frames, vectorised on the device (see module doc)."""

    def __init__(self, config: DetectorConfig = DetectorConfig(), device: str | torch.device | None = None):
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = torch.float16 if (config.half and self.device.type == "cuda") else torch.float32
        # Bundled weights: the constructors load facenet_pytorch/data/{p,r,o}net.pt offline.
        self.pnet = PNet().to(self.device, self.dtype).eval()
        self.rnet = RNet().to(self.device, self.dtype).eval()
        self.onet = ONet().to(self.device, self.dtype).eval()
        self._grid_cache: dict[tuple[int, int], tuple] = {}

    def provenance(self) -> dict[str, Any]:
        import facenet_pytorch

        d = asdict(self.config)
        d["thresholds"] = list(d["thresholds"])
        d["half"] = self.dtype == torch.float16  # what runs: float16 only on CUDA
        return {"detector": "MTCNN (facenet-pytorch bundled P/R/O-net weights), batched pipeline",
                "facenet_pytorch_version": getattr(facenet_pytorch, "__version__", _dist_version("facenet-pytorch")),
                **d}

    def _scales(self, h: int, w: int) -> list[float]:
        m = 12.0 / self.config.min_face_size
        minl = min(h, w) * m
        scales, s = [], m
        while minl >= 12:
            scales.append(s)
            s *= self.config.factor
            minl *= self.config.factor
        return scales

    def _grid(self, h: int, w: int):
        """Per frame size: the pyramid sizes and, for every PNet output cell of every scale
        (flattened in scale, row, column order), its window (K, 4) and scale index."""
        key = (h, w)
        if key in self._grid_cache:
            return self._grid_cache[key]
        sizes, q, sid = [], [], []
        for k, s in enumerate(self._scales(h, w)):
            hs, ws = int(h * s + 1), int(w * s + 1)
            # PNet: conv3 -> maxpool2 (ceil) -> conv3 -> conv3
            oh, ow = -(-(hs - 2) // 2) - 4, -(-(ws - 2) // 2) - 4
            if oh <= 0 or ow <= 0:
                continue
            yy, xx = torch.meshgrid(torch.arange(oh), torch.arange(ow), indexing="ij")
            bb = torch.stack([xx.flatten(), yy.flatten()], dim=1).float()  # (oh*ow, 2) x, y
            q1 = ((2 * bb + 1) / s).floor()
            q2 = ((2 * bb + 12) / s).floor()
            q.append(torch.cat([q1, q2], dim=1))
            sid.append(torch.full((oh * ow,), k, dtype=torch.long))
            sizes.append((hs, ws, oh * ow))
        grid = (sizes, torch.cat(q).to(self.device), torch.cat(sid).to(self.device))
        self._grid_cache[key] = grid
        return grid

    @torch.no_grad()
    def _run(self, x: torch.Tensor):
        """x: (B, 3, H, W) float 0..255 on the device. Returns per kept face (all faces, not
        yet one per frame): boxes (K, 4), scores (K,), frame index (K,)."""
        B, _, H, W = x.shape
        t0, t1, t2 = self.config.thresholds
        dev = x.device
        empty = (torch.empty(0, 4, device=dev), torch.empty(0, device=dev),
                 torch.empty(0, dtype=torch.long, device=dev))
        sizes, grid_q, grid_s = self._grid(H, W)
        if not sizes:
            return empty
        # Stage 1: PNet on every scale of the whole batch; one nonzero over all cells.
        probs, regs = [], []
        for hs, ws, _ in sizes:
            im = F.interpolate(x, size=(hs, ws), mode="area")
            im = ((im - 127.5) * 0.0078125).to(self.dtype)
            reg, prob = self.pnet(im)  # (B, 4, oh, ow), (B, 2, oh, ow)
            probs.append(prob[:, 1].flatten(1).float())  # (B, oh*ow)
            regs.append(reg.flatten(2).float())  # (B, 4, oh*ow)
        P = torch.cat(probs, dim=1)  # (B, N)
        R = torch.cat(regs, dim=2)  # (B, 4, N)
        img, cell = (P >= t0).nonzero(as_tuple=True)  # frame-major order
        if img.numel() == 0:
            return empty
        score = P[img, cell]
        reg = R[img, :, cell]  # (K, 4)
        boxes = grid_q[cell]  # (K, 4)
        n_scales = len(sizes)
        keep = _grouped_nms(boxes, score, img * n_scales + grid_s[cell], 0.5, self.config.max_nms_boxes)
        keep = keep.sort().values  # back to frame-major order for the next grouped NMS
        boxes, score, reg, img = boxes[keep], score[keep], reg[keep], img[keep]
        keep = _grouped_nms(boxes, score, img, 0.7, self.config.max_nms_boxes)
        boxes, score, reg, img = boxes[keep], score[keep], reg[keep], img[keep]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = _rerec(boxes + reg * torch.stack([w, h, w, h], dim=1))

        crop = _AreaCropper(x)
        # Stage 2: RNet on all candidates of all frames.
        y0, y1, x0, x1, valid = _pad(boxes, W, H)
        if not bool(valid.all()):
            boxes, img, y0, y1, x0, x1 = boxes[valid], img[valid], y0[valid], y1[valid], x0[valid], x1[valid]
        if img.numel() == 0:
            return empty
        im = ((crop(img, y0, y1, x0, x1, 24) - 127.5) * 0.0078125).to(self.dtype)
        reg, prob = _chunked(self.rnet, im)
        score = prob[:, 1].float()
        ipass = score > t1
        boxes, score, img, reg = boxes[ipass], score[ipass], img[ipass], reg[ipass].float()
        if img.numel() == 0:
            return empty
        order = torch.argsort(img, stable=True)
        boxes, score, img, reg = boxes[order], score[order], img[order], reg[order]
        keep = _grouped_nms(boxes, score, img, 0.7, self.config.max_nms_boxes)
        boxes, score, img, reg = boxes[keep], score[keep], img[keep], reg[keep]
        boxes = _rerec(_bbreg(boxes, reg))

        # Stage 3: ONet.
        y0, y1, x0, x1, valid = _pad(boxes, W, H)
        if not bool(valid.all()):
            boxes, img, y0, y1, x0, x1 = boxes[valid], img[valid], y0[valid], y1[valid], x0[valid], x1[valid]
        if img.numel() == 0:
            return empty
        im = ((crop(img, y0, y1, x0, x1, 48) - 127.5) * 0.0078125).to(self.dtype)
        reg, _landmarks, prob = _chunked(self.onet, im)
        score = prob[:, 1].float()
        ipass = score > t2
        boxes, score, img, reg = boxes[ipass], score[ipass], img[ipass], reg[ipass].float()
        boxes = _bbreg(boxes, reg)
        keep = _min_nms(boxes, score, img, 0.7)
        return boxes[keep], score[keep], img[keep]

    def _select(self, boxes: torch.Tensor, score: torch.Tensor, img: torch.Tensor, B: int):
        """One face per frame, on the device: (B, 4) boxes, (B,) probs, (B,) found."""
        dev = boxes.device
        out_b = torch.full((B, 4), float("nan"), device=dev)
        out_p = torch.full((B,), float("nan"), device=dev)
        found = torch.zeros(B, dtype=torch.bool, device=dev)
        if img.numel():
            if self.config.selection == "largest":
                key = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            else:
                key = score
            o = torch.argsort(key, descending=True, stable=True)
            o = o[torch.argsort(img[o], stable=True)]  # by frame, best first within a frame
            gi = img[o]
            first = torch.ones_like(gi, dtype=torch.bool)
            first[1:] = gi[1:] != gi[:-1]
            sel = o[first]
            out_b[img[sel]] = boxes[sel].float()
            out_p[img[sel]] = score[sel]
            found[img[sel]] = True
        return out_b, out_p, found

    def detect_tensor(self, x: torch.Tensor):
        """x: (B, 3, H, W) float 0..255 on the device -> device tensors (boxes, probs, found)."""
        boxes, score, img = self._run(x)
        return self._select(boxes, score, img, x.shape[0])

    def detect(self, frames: np.ndarray | torch.Tensor) -> Detections:
        """frames: uint8 RGB (B, H, W, 3) -> one face (or none) per frame."""
        x = _as_batch(frames, self.device)
        b, p, f = self.detect_tensor(x)
        return Detections(b.cpu().numpy(), p.cpu().numpy(), f.cpu().numpy())

    def detect_and_crop(self, frames: np.ndarray | torch.Tensor):
        """Detect and cut the faces: returns (Detections, crops (F, 1, S, S) float in [0, 1]
        on the device, one per frame with a face, in frame order)."""
        x = _as_batch(frames, self.device)
        b, p, f = self.detect_tensor(x)
        idx = f.nonzero().flatten()
        crops = crop_faces(x, b[idx], idx, self.config.margin, self.config.crop_size)
        return Detections(b.cpu().numpy(), p.cpu().numpy(), f.cpu().numpy()), crops


def _chunked(net, im: torch.Tensor, size: int = 16384):
    """Run ``net`` over ``im`` in chunks (bounded activation memory for very many boxes)."""
    if im.shape[0] <= size:
        return net(im)
    outs = [net(im[i:i + size]) for i in range(0, im.shape[0], size)]
    return tuple(torch.cat(v, dim=0) for v in zip(*outs))


def crop_faces(x: torch.Tensor, boxes: torch.Tensor, img: torch.Tensor, margin: float, size: int) -> torch.Tensor:
    """Grayscale face crops: each box is squared around its centre (side = longer side),
    widened by ``margin`` * side on every side, clipped to the frame, converted to luma
    (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B, as OpenCV's RGB2GRAY) and resampled to
    ``size`` x ``size`` with bilinear ROI averaging. x: (B, 3, H, W) float 0..255;
    boxes (F, 4); img (F,) frame index. Returns (F, 1, size, size) float in [0, 1]."""
    if boxes.shape[0] == 0:
        return torch.empty(0, 1, size, size, device=x.device)
    H, W = x.shape[2:]
    sq = _rerec(boxes.float())
    side = sq[:, 2] - sq[:, 0]
    m = (margin * side)[:, None]
    sq = sq + torch.cat([-m, -m, m, m], dim=1)
    sq[:, 0::2] = sq[:, 0::2].clamp(0, W)
    sq[:, 1::2] = sq[:, 1::2].clamp(0, H)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1) / 255.0  # (B, 1, H, W)
    rois = torch.cat([img[:, None].float(), sq], dim=1)  # (F, 5)
    return roi_align(gray, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def normalise(gray01: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The one normalisation of Denseface inputs, shared by training and extraction:
    ``(x - mean) / std`` with x the grayscale face in [0, 1] and ``mean``/``std`` the pixel
    statistics of the training images (stored in the checkpoint)."""
    return (gray01 - mean) / std


class ReferenceMTCNN:
    """The off-the-shelf ``facenet_pytorch.MTCNN.detect``, reduced to the same one face per
    frame (``selection``) and the same ``Detections``."""

    def __init__(self, config: DetectorConfig = DetectorConfig(), device: str | torch.device | None = None):
        from facenet_pytorch import MTCNN

        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mtcnn = MTCNN(min_face_size=config.min_face_size, thresholds=list(config.thresholds),
                           factor=config.factor, select_largest=config.selection == "largest",
                           device=self.device)

    def detect(self, frames: np.ndarray) -> Detections:
        B = len(frames)
        boxes = np.full((B, 4), np.nan, dtype=np.float32)
        probs = np.full(B, np.nan, dtype=np.float32)
        found = np.zeros(B, dtype=bool)
        bb, pp = self.mtcnn.detect(np.ascontiguousarray(frames))
        for i, (b, p) in enumerate(zip(bb, pp)):
            if b is None:
                continue
            b, p = np.asarray(b, dtype=np.float32), np.asarray(p, dtype=np.float32)
            # detect() orders by area when select_largest, else by NMS order (= probability)
            boxes[i], probs[i], found[i] = b[0], p[0], True
        return Detections(boxes, probs, found)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (N, 4) box arrays (NaN where either is NaN)."""
    x1 = np.maximum(a[:, 0], b[:, 0])
    y1 = np.maximum(a[:, 1], b[:, 1])
    x2 = np.minimum(a[:, 2], b[:, 2])
    y2 = np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    def area(z: np.ndarray) -> np.ndarray:
        return (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])

    return inter / (area(a) + area(b) - inter)


def agreement(a: Detections, b: Detections) -> dict[str, float]:
    """How two detectors agree on the same frames: share of frames where both find a face or
    both find none, frames with a face in both, median IoU of those boxes."""
    both = a.found & b.found
    iou = box_iou(a.boxes[both], b.boxes[both]) if both.any() else np.array([])
    return {"frames": int(len(a.found)), "agree": float(np.mean(a.found == b.found)),
            "face_in_both": int(both.sum()), "face_only_a": int((a.found & ~b.found).sum()),
            "face_only_b": int((b.found & ~a.found).sum()),
            "median_iou": float(np.median(iou)) if len(iou) else float("nan"),
            "min_iou": float(np.min(iou)) if len(iou) else float("nan")}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
