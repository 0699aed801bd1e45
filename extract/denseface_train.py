"""Training Denseface on FER+, and its checkpoints.

Data: ``fer2013.csv`` (``emotion,pixels,Usage``: 48x48 grayscale images as 2,304
space-separated integers) and the FER+ relabelling ``fer2013new.csv`` (``Usage,Image name,
neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF``: ten raters'
vote counts), row ``i`` of one describing row ``i`` of the other. Splits follow ``Usage``:
``Training`` -> train, ``PublicTest`` -> validation, ``PrivateTest`` -> test.

Label rule (``TrainConfig.label_rule``), as the FER+ authors' reference code does it: votes
cast by a single rater for an emotion are removed as outliers first, then

- ``"majority"`` (default): the image is labelled with the emotion holding more than half of
  the remaining votes; images with no such emotion are dropped ("no majority");
- ``"distribution"``: the reference's "probability"/"crossentropy" target (soft
  cross-entropy): the emotions with the most votes (tied ones together, at most three) are
  taken until they hold 75 % of the votes, and the target is their share of those votes;
  an ``unknown``/``NF`` tied with them ends the list; an image whose taken emotions hold at
  most half of the votes is dropped ("no majority").

Under both rules images without an ``Image name`` (removed by FER+), whose top vote is
``NF`` (not a face) or ``unknown`` are dropped; every drop is counted in the data report.
Accuracy compares the arg-max prediction with the arg-max target.

Inputs: the 48x48 images are resized to 64x64 (bilinear), scaled to [0, 1] and normalised
with ``cmarr.extract.faces.normalise`` by the mean and standard deviation of the training
split's pixels, which the checkpoint stores so that extraction normalises face crops the
same way. Augmentation (training only, one affine warp per batch on the device): random
crop with ``pad`` pixels of zero padding (a shift of up to ``pad`` px), horizontal flip with
probability 0.5, rotation uniform in +-``rotation`` degrees.

Checkpoint: ``torch.save`` of a dict of tensors and plain values (loadable with
``weights_only=True``): the state dict, the architecture and training configs, the sha256
and row counts of both CSV files, the data report, epochs, validation/test accuracy, the
normalisation, library versions and the time. Its own sha256 (``file_sha256``) is what the
feature store records.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cmarr.extract.base import ExtractError
from cmarr.extract.faces import normalise
from cmarr.extract.files import durable_replace, file_sha256
from cmarr.model.denseface import FERPLUS_CLASSES, DenseFace, DenseFaceConfig

FER2013_COLUMNS = ("emotion", "pixels", "Usage")
FERPLUS_COLUMNS = ("Usage", "Image name") + FERPLUS_CLASSES + ("unknown", "NF")
SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
LABEL_RULES = ("majority", "distribution")
CHECKPOINT_FORMAT = "cm-arr-denseface/1"
# FER2013's own 7 codes (0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral) for
# the FER+ classes, used only when writing a pair: FER+ labels come from the vote counts, and
# contempt, which FER2013 lacks, is written as disgust.
_FER2013_CODE = {0: 6, 1: 3, 2: 5, 3: 4, 4: 0, 5: 1, 6: 2, 7: 1}


class FerDataError(ValueError):
    """Malformed FER2013 / FER+ input; ``str(e)`` is ``"<file>:<line>: <problem>"``."""


@dataclass(frozen=True)
class TrainConfig:
    """How Denseface is trained (defaults: SGD with Nesterov momentum 0.9, lr 0.1 with a
    cosine decay, weight decay 1e-4, batch 64, 40 epochs: the DenseNet-BC recipe scaled to
    FER+'s ~28k training images). ``input_size`` 64; augmentation ``pad`` 4 px,
    ``rotation`` 10 degrees, ``flip`` on. ``select`` "best_val": the epoch with the best
    validation accuracy is kept ("last": the final epoch). ``max_train``: use only the
    first N training images (demos, tests; None = all)."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_rule: str = "majority"
    input_size: int = 64
    pad: int = 4
    rotation: float = 10.0
    flip: bool = True
    select: str = "best_val"
    seed: int = 0
    max_train: int | None = None
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.label_rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {self.label_rule!r}")
        if self.select not in ("best_val", "last"):
            raise ValueError(f"select must be 'best_val' or 'last', got {self.select!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class FerData:
    """Images (N, 48, 48) uint8, targets (N, 8) float (one-hot or distribution), split
    names (N,) in {"train", "val", "test"}, and the report of what was kept and dropped."""

    images: np.ndarray
    targets: np.ndarray
    split: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def _open_rows(path: Path, expected: tuple[str, ...]):
    if not path.is_file():
        raise FerDataError(f"{path}: file not found")
    f = open(path, newline="")
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise FerDataError(f"{path}:1: empty file, expected header {','.join(expected)}") from None
    if tuple(h.strip() for h in header) != expected:
        f.close()
        raise FerDataError(f"{path}:1: header {header} is not {list(expected)}")
    return f, reader


def label_votes(votes: np.ndarray, rule: str) -> tuple[np.ndarray | None, str]:
    """FER+ votes (10,) -> (target (8,) or None, reason). Reasons: "ok", "nf", "unknown",
    "no_majority", "no_votes" (see module doc for the rule)."""
    v = votes.astype(np.float64).copy()
    v[v <= 1.0] = 0.0  # a single rater's vote is an outlier
    total = v.sum()
    if total <= 0:
        return None, "no_votes"
    top = int(np.argmax(v))
    if top == 9:
        return None, "nf"
    if top == 8:
        return None, "unknown"
    if rule == "majority":
        if v[top] <= 0.5 * total:
            return None, "no_majority"
        t = np.zeros(8)
        t[top] = 1.0
        return t, "ok"
    # the reference's "probability"/"crossentropy" target: the top emotions (ties together, at
    # most 3) until they hold 75 % of the votes, stopping at an unknown/NF tie (kept only when
    # nothing came before it); dropped when they hold at most half the votes
    e, raw, part, count = np.zeros_like(v), v.copy(), 0.0, 0
    valid = True
    while part < 0.75 * total and count < 3 and valid:
        m = raw.max()
        for i in range(len(raw)):
            if raw[i] == m:
                e[i], raw[i] = m, 0.0
                part += m
                count += 1
                if i >= 8:  # unknown or NF as many votes as the emotion(s) before it
                    valid = False
                    if e.sum() > m:
                        e[i] = 0.0
                        count -= 1
                    break
    if e.sum() <= 0.5 * total or count > 3:
        return None, "no_majority"
    if int(np.argmax(e)) >= 8:
        return None, "unknown" if int(np.argmax(e)) == 8 else "nf"
    return e[:8] / e[:8].sum(), "ok"


def read_ferplus(fer2013: str | Path, ferplus: str | Path, label_rule: str = "majority") -> FerData:
    """Read and join both CSV files; ``FerDataError`` naming file and line on a malformed
    row (wrong field count, pixels that are not 2,304 integers in 0..255, votes that are not
    non-negative integers, an unknown Usage, Usage disagreeing between the files, files of
    different lengths)."""
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
    p1, p2 = Path(fer2013), Path(ferplus)
    f1, r1 = _open_rows(p1, FER2013_COLUMNS)
    f2, r2 = _open_rows(p2, FERPLUS_COLUMNS)
    images, targets, split = [], [], []
    counts = {"rows": 0, "removed_by_ferplus": 0, "nf": 0, "unknown": 0, "no_majority": 0, "no_votes": 0}
    try:
        while True:
            a = next(r1, None)
            b = next(r2, None)
            if a is None and b is None:
                break
            if a is None or b is None:
                longer, line = (p2, r2.line_num) if a is None else (p1, r1.line_num)
                raise FerDataError(f"{longer}:{line}: the two files differ in length "
                                   f"({p1.name} and {p2.name} must describe the same images row by row)")
            if not a and not b:
                continue
            counts["rows"] += 1
            if len(a) != 3:
                raise FerDataError(f"{p1}:{r1.line_num}: expected 3 fields (emotion,pixels,Usage), got {len(a)}")
            if len(b) != len(FERPLUS_COLUMNS):
                raise FerDataError(f"{p2}:{r2.line_num}: expected {len(FERPLUS_COLUMNS)} fields, got {len(b)}")
            usage = a[2].strip()
            if usage not in SPLITS:
                raise FerDataError(f"{p1}:{r1.line_num}: Usage {usage!r} is not one of {list(SPLITS)}")
            if b[0].strip() != usage:
                raise FerDataError(f"{p2}:{r2.line_num}: Usage {b[0]!r} differs from {usage!r} at "
                                   f"{p1.name}:{r1.line_num}")
            try:
                px = np.array(a[1].split(), dtype=np.int64)
            except ValueError:
                raise FerDataError(f"{p1}:{r1.line_num}: pixels are not integers") from None
            if px.size != 48 * 48:
                raise FerDataError(f"{p1}:{r1.line_num}: {px.size} pixels, expected 2304 (48x48)")
            if px.min() < 0 or px.max() > 255:
                raise FerDataError(f"{p1}:{r1.line_num}: pixel values outside 0..255")
            try:
                votes = np.array([int(x) for x in b[2:]], dtype=np.int64)
            except ValueError:
                raise FerDataError(f"{p2}:{r2.line_num}: vote counts are not integers: {b[2:]}") from None
            if (votes < 0).any():
                raise FerDataError(f"{p2}:{r2.line_num}: negative vote count")
            if not b[1].strip():
                counts["removed_by_ferplus"] += 1
                continue
            t, why = label_votes(votes, label_rule)
            if t is None:
                counts[why] += 1
                continue
            images.append(px.astype(np.uint8).reshape(48, 48))
            targets.append(t)
            split.append(SPLITS[usage])
    finally:
        f1.close()
        f2.close()
    split_a = np.array(split, dtype=object)
    tg = np.array(targets, dtype=np.float32).reshape(-1, 8)
    report = {"label_rule": label_rule, **counts, "kept": len(images),
              "dropped": counts["rows"] - len(images),
              "kept_per_split": {s: int((split_a == s).sum()) for s in ("train", "val", "test")},
              "kept_per_class": {c: int((tg.argmax(1) == i).sum()) for i, c in enumerate(FERPLUS_CLASSES)}}
    if not images:
        raise FerDataError(f"{p2}: no usable image after applying the label rule ({report})")
    return FerData(np.stack(images), tg, split_a, report)


def _prepare(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, 48, 48) uint8 -> (N, 1, size, size) float in [0, 1]."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # (N, 1, 48, 48)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0, 1)


def augment(x: torch.Tensor, pad: int, rotation: float, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """One affine warp per image: random shift of up to ``pad`` px (random crop of a
    zero-padded image), horizontal flip, rotation in +-``rotation`` degrees. x: (B, 1, S, S)."""
    B, _, S, _ = x.shape
    dev = x.device
    u = torch.rand(B, 4, generator=gen).to(dev)
    ang = (u[:, 0] * 2 - 1) * math.radians(rotation)
    sx = torch.where(u[:, 1] < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    shift = torch.randint(-pad, pad + 1, (B, 2), generator=gen).to(dev).float() * 2.0 / S  # normalised coords
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos * sx, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sx, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def evaluate(model: DenseFace, x: torch.Tensor, targets: torch.Tensor, mean: float, std: float,
             batch_size: int, device: torch.device) -> float:
    """Accuracy (arg-max prediction = arg-max target) on prepared images x (N, 1, S, S)."""
    if len(x) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = normalise(x[i:i + batch_size].to(device), mean, std)
        _, logits = model(xb)
        correct += int((logits.argmax(1).cpu() == targets[i:i + batch_size].argmax(1)).sum())
    return correct / len(x)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    try:
        out["cm-arr"] = version("cm-arr")
    except PackageNotFoundError:
        out["cm-arr"] = "unknown"
    return out


def train_denseface(fer2013: str | Path, ferplus: str | Path, out: str | Path,
                    config: TrainConfig = TrainConfig(), model_config: DenseFaceConfig = DenseFaceConfig(),
                    device: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train on FER+ and write the checkpoint ``out``. Returns the checkpoint's record
    (without the weights) plus ``checkpoint_sha256``."""
    from cmarr.extract.hf import resolve_device

    dev = torch.device(resolve_device(device or "auto"))  # ExtractError for a bad or absent device
    out = Path(out)
    _check_writable(out)  # before hours of training, not after
    data = read_ferplus(fer2013, ferplus, config.label_rule)
    rep = data.report
    log(f"FER+: {rep['rows']} rows, kept {rep['kept']} ({rep['kept_per_split']}), dropped {rep['dropped']}: "
        f"removed by FER+ {rep['removed_by_ferplus']}, not a face {rep['nf']}, unknown {rep['unknown']}, "
        f"no majority {rep['no_majority']}, no votes {rep['no_votes']}")
    tr = data.split == "train"
    idx_tr = np.flatnonzero(tr)
    if config.max_train is not None:
        idx_tr = idx_tr[: config.max_train]
    if len(idx_tr) == 0:
        raise FerDataError(f"{fer2013}: no Training rows left after the label rule")
    x_tr = _prepare(data.images[idx_tr], config.input_size)
    y_tr = torch.from_numpy(data.targets[idx_tr])
    x_va = _prepare(data.images[data.split == "val"], config.input_size)
    y_va = torch.from_numpy(data.targets[data.split == "val"])
    select = config.select
    if len(x_va) == 0 and select != "last":
        log(f"{ferplus}: no PublicTest (validation) rows: no epoch can be selected on validation, the last one is kept")
        select = "last"
    x_te = _prepare(data.images[data.split == "test"], config.input_size)
    y_te = torch.from_numpy(data.targets[data.split == "test"])
    mean, std = float(x_tr.mean()), float(x_tr.std())
    if not std > 0:
        raise FerDataError(f"{fer2013}: training images have no pixel variation")

    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = DenseFace(model_config).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    steps = config.epochs * math.ceil(len(x_tr) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    best = (-1.0, None, 0)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x_tr), generator=gen)
        tot, n = 0.0, 0
        for i in range(0, len(perm), config.batch_size):
            b = perm[i:i + config.batch_size]
            if len(b) < 2:  # BatchNorm needs two samples
                continue
            xb = augment(x_tr[b].to(dev), config.pad, config.rotation, config.flip, gen)
            xb = normalise(xb, mean, std)
            yb = y_tr[b].to(dev)
            _, logits = model(xb)
            loss = F.cross_entropy(logits, yb.argmax(1) if config.label_rule == "majority" else yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(b)
            n += len(b)
        val = evaluate(model, x_va, y_va, mean, std, config.eval_batch_size, dev)
        history.append({"epoch": epoch, "train_loss": tot / max(n, 1), "val_acc": val, "seconds": time.time() - t0})
        log(f"epoch {epoch}/{config.epochs}: train loss {tot / max(n, 1):.4f}, val acc {val:.4f} "
            f"({time.time() - t0:.1f} s)")
        score = val if not math.isnan(val) else -0.5
        if select == "last" or score > best[0]:
            best = (score, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    test = evaluate(model, x_te, y_te, mean, std, config.eval_batch_size, dev)
    log(f"kept epoch {best[2]} ({select}); FER+ test accuracy {test:.4f} on {len(x_te)} images")
    record = {
        "format": CHECKPOINT_FORMAT,
        "model_config": asdict(model_config),
        "train_config": asdict(config),
        "data": {"fer2013": {"name": Path(fer2013).name, "sha256": file_sha256(fer2013)},
                 "ferplus": {"name": Path(ferplus).name, "sha256": file_sha256(ferplus)},
                 "report": rep},
        "epochs": config.epochs,
        "kept_epoch": best[2],
        "history": history,
        "selected_by": select,
        "val_accuracy": None if math.isnan(history[best[2] - 1]["val_acc"]) else history[best[2] - 1]["val_acc"],
        "test_accuracy": test,
        "n_test": len(x_te),
        "normalisation": {"mean": mean, "std": std, "rule": "(gray/255 - mean) / std, training-split pixel statistics"},
        "input": {"size": config.input_size, "channels": 1, "source_size": 48, "resize": "bilinear"},
        "versions": _versions(),
        "device": str(dev),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(out, best[1], record)
    return {**record, "checkpoint_sha256": file_sha256(out)}


def _check_writable(out: Path) -> None:
    """``ExtractError`` unless a checkpoint can be written at ``out`` (its folder created if needed)."""
    if out.is_dir():
        raise ExtractError(f"{out}: is a folder; --out names the checkpoint file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExtractError(f"{out.parent}: cannot create the folder for the checkpoint ({e.strerror or e})") from None
    probe = out.with_name(f".{out.name}.probe{os.getpid()}")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExtractError(f"{out}: cannot be written ({e.strerror or e})") from None


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], record: dict[str, Any]) -> str:
    """Write atomically (temporary file, then rename); returns the file's sha256."""
    path = Path(path)
    _check_writable(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save({"record": record, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise ExtractError(f"{path}: cannot write the checkpoint ({e})") from None
    durable_replace(tmp, path)
    return file_sha256(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DenseFace, dict[str, Any]]:
    """Load a checkpoint written by ``save_checkpoint`` -> (model in eval mode, record).
    ``ExtractError`` naming the file when it is missing, unreadable or not a Denseface
    checkpoint, or when its weights do not fit the recorded architecture."""
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"{path}: Denseface checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ExtractError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ck, dict) or "record" not in ck or "state_dict" not in ck \
            or ck["record"].get("format") != CHECKPOINT_FORMAT:
        raise ExtractError(f"{path}: not a Denseface checkpoint (expected format {CHECKPOINT_FORMAT})")
    rec = ck["record"]
    try:
        model = DenseFace(DenseFaceConfig(**rec["model_config"]))
        model.load_state_dict(ck["state_dict"])
    except (TypeError, RuntimeError, KeyError) as e:
        raise ExtractError(f"{path}: weights do not fit the recorded architecture: "
                           f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval(), rec


def write_ferplus_pair(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, usage: list[str] | np.ndarray,
                       votes: int = 10) -> tuple[Path, Path]:
    """Write a FER2013/FER+ pair of CSV files for 48x48 grayscale ``images`` (N, 48, 48)
    uint8 with class ``labels`` (N,) in 0..7 (``FERPLUS_CLASSES`` order) and ``usage``
    (N,) in Training/PublicTest/PrivateTest. Every image gets ``votes`` votes for its
    label (an unambiguous majority). Returns (fer2013.csv, fer2013new.csv)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (48, 48) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, 48, 48), got {images.dtype} {images.shape}")
    p1, p2 = out_dir / "fer2013.csv", out_dir / "fer2013new.csv"
    with open(p1, "w", newline="") as f1, open(p2, "w", newline="") as f2:
        w1, w2 = csv.writer(f1), csv.writer(f2)
        w1.writerow(FER2013_COLUMNS)
        w2.writerow(FERPLUS_COLUMNS)
        for i, (im, lab, u) in enumerate(zip(images, labels, usage)):
            w1.writerow([_FER2013_CODE[int(lab)], " ".join(map(str, im.reshape(-1).tolist())), u])
            v = [0] * 10
            v[int(lab)] = votes
            w2.writerow([u, f"fer{i:07d}.png"] + v)
    return p1, p2


def demo_ferplus_pair(out_dir: str | Path, faces: list[np.ndarray], n: int = 240, seed: int = 0) -> tuple[Path, Path]:
    """A small FER+-format pair for demos and tests, made from face crops (grayscale uint8
    arrays of any size; e.g. ``BatchedMTCNN.detect_and_crop`` output * 255). Image ``i``
    is a randomly shifted, scaled, mirrored, brightness-changed copy of face
    ``k = i % len(faces)`` labelled ``k % 8``, so that the labels are learnable; 80/10/10 % go to
    Training/PublicTest/PrivateTest. It trains the real code path; the labels carry no
    emotion and the resulting weights are for demonstrations only."""
    import cv2

    rng = np.random.default_rng(seed)
    imgs, labels, usage = [], [], []
    for i in range(n):
        k = i % len(faces)
        f = np.asarray(faces[k], dtype=np.float32)
        s = rng.uniform(0.9, 1.1)
        tx, ty = rng.uniform(-0.05, 0.05, 2) * f.shape[1]
        M = np.array([[s, 0, tx + (1 - s) * f.shape[1] / 2], [0, s, ty + (1 - s) * f.shape[0] / 2]], np.float32)
        g = cv2.warpAffine(f, M, (f.shape[1], f.shape[0]), borderMode=cv2.BORDER_REPLICATE)
        g = cv2.resize(g, (48, 48), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            g = g[:, ::-1]
        g = np.clip(g * rng.uniform(0.8, 1.2) + rng.normal(0, 3, g.shape), 0, 255).astype(np.uint8)
        imgs.append(g)
        labels.append(k % 8)
        r = rng.random()
        usage.append("Training" if r < 0.8 else "PublicTest" if r < 0.9 else "PrivateTest")
    return write_ferplus_pair(out_dir, np.stack(imgs), np.array(labels), usage)
