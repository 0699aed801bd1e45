"""How far two results of the same float computation may lie apart when they were computed
in another summation order: another batch (padding, neighbours), another process or shard,
a resumed run, another thread count, another CPU's kernels. Imported by the tests
(``from tolerance import ...``: pytest puts ``tests/`` on the path, it has no ``__init__``).

The bound, stated once:

- A float32 sum of ``n`` terms done in another order rounds differently by about
  ``eps32 * sqrt(n) * scale`` (``eps32 = 2**-23``; rounding errors of random sign add up as a
  random walk; ``scale`` is the size of the values the sums produce). A network chains such
  sums; the errors of successive sums are independent and add in quadrature, and its
  normalisations keep the values at one scale, so the outputs of two orders differ by at most
  ``delta = k * eps32 * scale`` with ``k = sqrt(depth)``, ``depth`` being the number of terms
  summed into one output value along the network (the sum of its reduction lengths, layer
  after layer: ``*_DEPTH`` below) and ``scale`` the largest ``|x|`` of the tensor compared
  (an utterance's frames).
- Stored as float16 (round to nearest), the two values ``a``, ``b`` become values that differ
  by at most ``delta`` plus one float16 spacing at ``max(|a|, |b|)`` (each rounding moves a
  value by at most half a spacing). Near zero ``delta`` dominates: float16 steps there are
  far finer than float32 rounding at the activations' scale (many steps apart is normal);
  at ``|x|`` of order 1 the spacing does (one step apart at most).

Margin, text (``MINILM_DEPTH``, ``k`` = 149): at scale 5.6 ``delta`` = 9.9e-5; the largest
difference seen on values near zero (a merged store and a resumed store on another x86-64
machine) is 2.2e-6, i.e. 3.3 ``eps32 * scale``, 45 times inside. Measured here between
batchings and thread counts (1 and 2): speech up to 10 ``eps32 * scale`` (``k`` = 41), text
up to 5 (``k`` = 149). A real error is far outside: another utterance's frames or frames
shifted by one differ by a good fraction of the scale (tests in test_features.py).
"""
from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

#: The tiny random wav2vec2 of the tests (hidden 32, 2 blocks, FFN 64, 7 convs of 32
#: channels, positional conv of 16 taps over 8 channels per group), over at most 256 frames:
#: convs 10 + 4*96 + 2*64, feature projection (LayerNorm, Linear) 2*32, positional conv 16*8,
#: per block q/k/v, out, LayerNorm, FFN in, LayerNorm 5*32 + scores 16 (head width) +
#: attention over 256 frames + FFN out 64.
TINY_WAV2VEC2_DEPTH = 10 + 4 * 96 + 2 * 64 + 2 * 32 + 16 * 8 + 2 * (5 * 32 + 16 + 256 + 64)

#: all-MiniLM-L6-v2 (hidden 384, 6 blocks, FFN 1536, 12 heads of 32), over at most 128 word
#: pieces: embedding LayerNorm 384, per block q/k/v, out, LayerNorm, FFN in, LayerNorm
#: 5*384 + scores 32 + attention over 128 pieces + FFN out 1536.
MINILM_DEPTH = 384 + 6 * (5 * 384 + 32 + 128 + 1536)


#: The tiny CM-ARR of the training tests (``conftest.TINY_MODEL``: d_model 16) on a synthetic
#: store (inputs 8-d at most): the input projection's 8 products, then at most 20 chained
#: layers (encoders, flow, UMC, fusion, RCAN, classifier) of at most 3 x 16 terms each
#: (attention's in-projection, scores and out-projection; a linear layer and its LayerNorm).
TINY_CMARR_DEPTH = 8 + 20 * 3 * 16


def reorder_bound(scale: float, depth: int, eps: float = EPS32) -> float:
    """``delta = sqrt(depth) * eps * scale``: how far two results of one computation of
    ``depth`` summed terms per value, done in two summation orders, may differ (module
    docstring). ``eps`` is that of the computation's dtype (``np.finfo(dtype).eps``)."""
    return math.sqrt(depth) * eps * float(scale)


def _scale(x: np.ndarray, y: np.ndarray) -> float:
    return float(max(np.abs(x).max(initial=0.0), np.abs(y).max(initial=0.0)))


def float16_tolerance(x: np.ndarray, y: np.ndarray, depth: int) -> np.ndarray:
    """Per value of two float16 arrays (one utterance's frames): ``delta`` at the arrays'
    largest ``|x|`` plus one float16 spacing at ``max(|x|, |y|)``, as float64."""
    assert x.dtype == y.dtype == np.float16 and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    spacing = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float64)
    return reorder_bound(_scale(xf, yf), depth) + spacing


def within_float16_rounding(x: np.ndarray, y: np.ndarray, depth: int) -> np.ndarray:
    """Per value: ``x`` and ``y`` (float16) may be the stored roundings of one float32
    computation done in two summation orders (``float16_tolerance``)."""
    diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
    return diff <= float16_tolerance(x, y, depth)


def assert_float16_close(x: np.ndarray, y: np.ndarray, depth: int, what: str = "") -> None:
    """``within_float16_rounding`` for every value, else an error naming the worst one."""
    ok = within_float16_rounding(x, y, depth)
    if not ok.all():
        tol = float16_tolerance(x, y, depth)
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        i = np.unravel_index(np.argmax(diff - tol), x.shape)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {x.size} values differ by more than float32 "
                             f"reordering plus one float16 step; worst at {tuple(map(int, i))}: {x[i]} vs {y[i]} "
                             f"(tolerance {tol[i]:.3g}, "
                             f"scale {_scale(x.astype(np.float64), y.astype(np.float64)):.3g})")


def assert_float32_close(a, b, depth: int, what: str = "", scale: float | None = None) -> None:
    """``|a - b| <= reorder_bound(scale, depth)`` everywhere, for float32 (or float64)
    results, ``scale`` by default the largest ``|x|`` of the two (numpy arrays or tensors)."""
    a, b = (np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for v in (a, b))
    assert a.shape == b.shape, (what, a.shape, b.shape)
    eps = float(np.finfo(np.result_type(a.dtype, b.dtype, np.float32)).eps)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    tol = reorder_bound(_scale(a64, b64) if scale is None else scale, depth, eps)
    diff = np.abs(a64 - b64)
    worst = float(diff.max(initial=0.0))
    assert np.isfinite(diff).all() and worst <= tol, \
        f"{what}: differs by up to {worst:.3g}, more than the reordering bound {tol:.3g} (depth {depth})"
