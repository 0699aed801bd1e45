"""Each loss against a tiny case worked by hand (the expected numbers are derived in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from cmarr.model.losses import info_nce, loss_cls, loss_nll, loss_rec, loss_spcl, loss_udcl, total_loss, wasserstein2

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wasserstein2_eq1() -> None:
    # ||(0,0)-(1,2)||^2 = 5, ||(1,1)-(2,1)||^2 = 1  ->  6
    d = wasserstein2(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]),
                     torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]]))
    assert d.shape == (1, 1)
    assert d.item() == pytest.approx(6.0)
    with pytest.raises(ValueError):
        wasserstein2(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), None)


def _udcl_case() -> tuple[torch.Tensor, torch.Tensor]:
    # two instances, two modalities n (index 0) and m (index 1), d = 1
    #   instance 0: n ~ N(0, 1^2), m ~ N(1, 1^2);  instance 1: n ~ N(3, 2^2), m ~ N(3, 1^2)
    mu = torch.tensor([[[0.0], [1.0]], [[3.0], [3.0]]])  # (B=2, M=2, d=1)
    sigma = torch.tensor([[[1.0], [1.0]], [[2.0], [1.0]]])
    return mu, sigma


def test_loss_udcl_distribution_hand_case() -> None:
    mu, sigma = _udcl_case()
    # D[i, j] = (mu_n_i - mu_m_j)^2 + (sigma_n_i - sigma_m_j)^2:
    #   D00 = 1 + 0 = 1, D01 = 9 + 0 = 9, D10 = 4 + 1 = 5, D11 = 0 + 1 = 1
    # a = -0.5, b = 1, tau = 0.5: logits = (1 - D/2) / 0.5 = 2 - D = [[1, -7], [-3, 1]]
    # n2m: row 0: -log(e^1 / (e^1 + e^-7)) = log(1 + e^-8); row 1: -log(e^1 / (e^-3 + e^1)) = log(1 + e^-4)
    # m2n (columns): row 0: logits [1, -3] -> log(1 + e^-4); row 1: [-7, 1] -> log(1 + e^-8)
    n2m = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-4))) / 2
    m2n = (math.log1p(math.exp(-4)) + math.log1p(math.exp(-8))) / 2
    valid = torch.ones(2, 2, dtype=torch.bool)
    got = loss_udcl(mu, sigma, valid, a=-0.5, b=1.0, tau=0.5)
    assert got.item() == pytest.approx(n2m + m2n, rel=1e-6, abs=1e-6)
    got_mean = loss_udcl(mu, sigma, valid, a=-0.5, b=1.0, tau=0.5, direction_reduction="mean")
    assert got_mean.item() == pytest.approx((n2m + m2n) / 2, rel=1e-6, abs=1e-6)


def test_loss_udcl_point_hand_cases() -> None:
    mu, _ = _udcl_case()
    valid = torch.ones(2, 2, dtype=torch.bool)
    # euclidean: D[i, j] = (mu_n_i - mu_m_j)^2 = [[1, 9], [4, 0]], logits = 2 - D = [[1, -7], [-2, 2]]
    # n2m: row 0: log(1 + e^-8); row 1: -log(e^2 / (e^-2 + e^2)) = log(1 + e^-4)
    # m2n (columns [1, -2], [-7, 2]): row 0: log(1 + e^-3); row 1: log(1 + e^-9)
    n2m = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-4))) / 2
    m2n = (math.log1p(math.exp(-3)) + math.log1p(math.exp(-9))) / 2
    got = loss_udcl(mu, None, valid, a=-0.5, b=1.0, tau=0.5)
    assert got.item() == pytest.approx(n2m + m2n, rel=1e-6, abs=1e-6)
    # cosine, tau = 1: n0 = (1,0), n1 = (0,1), m0 = (1,0), m1 = (1,1)/sqrt(2)
    #   cos = [[1, 1/sqrt2], [0, 1/sqrt2]]
    #   n2m: row 0: -log(e / (e + e^{1/sqrt2})), row 1: -log(e^{1/sqrt2} / (1 + e^{1/sqrt2}))
    #   m2n: row 0: logits [1, 0] -> -log(e / (e + 1)), row 1: [1/sqrt2, 1/sqrt2] -> log 2
    r = 1 / math.sqrt(2)
    n2m = (-math.log(math.e / (math.e + math.exp(r))) - math.log(math.exp(r) / (1 + math.exp(r)))) / 2
    m2n = (-math.log(math.e / (math.e + 1)) + math.log(2)) / 2
    mu_c = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 1.0]]])  # norms do not matter
    got_c = loss_udcl(mu_c, None, valid, a=-0.5, b=1.0, tau=1.0, point_similarity="cosine")
    assert got_c.item() == pytest.approx(n2m + m2n, rel=1e-6, abs=1e-6)


def test_loss_udcl_masks_instances_and_averages_pairs() -> None:
    mu, sigma = _udcl_case()
    expected = loss_udcl(mu, sigma, torch.ones(2, 2, dtype=torch.bool), a=-0.5, b=1.0, tau=0.5).item()
    # add a third instance whose modality m is absent: its junk values must not matter
    mu3 = torch.cat([mu, torch.tensor([[[100.0], [-50.0]]])])
    sigma3 = torch.cat([sigma, torch.tensor([[[7.0], [0.1]]])])
    valid3 = torch.tensor([[True, True], [True, True], [True, False]])
    assert loss_udcl(mu3, sigma3, valid3, a=-0.5, b=1.0, tau=0.5).item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # three modalities where the third is absent everywhere: the mean runs over the one valid pair
    mu_m3 = torch.cat([mu, torch.zeros(2, 1, 1)], dim=1)
    sigma_m3 = torch.cat([sigma, torch.ones(2, 1, 1)], dim=1)
    valid_m3 = torch.tensor([[True, True, False], [True, True, False]])
    assert (loss_udcl(mu_m3, sigma_m3, valid_m3, a=-0.5, b=1.0, tau=0.5).item()
            == pytest.approx(expected, rel=1e-6, abs=1e-6))
    # with pair_reduction="sum" the two empty pairs add 0
    got_sum = loss_udcl(mu_m3, sigma_m3, valid_m3, a=-0.5, b=1.0, tau=0.5, pair_reduction="sum")
    assert got_sum.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_info_nce_empty_and_single_rows_are_zero_with_finite_gradients() -> None:
    logits = torch.randn(3, 3, requires_grad=True)
    loss = info_nce(logits, torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    # one valid row: only its own diagonal is a candidate -> -log 1 = 0
    assert info_nce(torch.randn(3, 3), torch.tensor([False, True, False])).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_spcl_hand_case() -> None:
    # z0 = (1,0) label 0, z1 = (0,1) label 0, z2 = (1,0) label 1 (given unnormalised), T = 1
    # dot products: z0.z1 = 0, z0.z2 = 1, z1.z2 = 0
    # anchor 0: positive {1}, candidates {1, 2}: -log(e^0 / (e^0 + e^1)) = log(1 + e)
    # anchor 1: positive {0}, candidates {0, 2}: -log(e^0 / (e^0 + e^0)) = log 2
    # anchor 2: no positive -> not counted
    feats = torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    expected = (math.log(1 + math.e) + math.log(2)) / 2
    assert loss_spcl(feats, labels, temperature=1.0).item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # temperature 0.5 doubles the logits: anchor 0 -> log(1 + e^2), anchor 1 -> log 2
    expected_half = (math.log(1 + math.e ** 2) + math.log(2)) / 2
    assert loss_spcl(feats, labels, temperature=0.5).item() == pytest.approx(expected_half, rel=1e-6, abs=1e-6)
    # an invalid entry is neither anchor nor candidate: removing z2 leaves anchors 0, 1 with only
    # each other as candidate -> -log 1 = 0
    valid = torch.tensor([True, True, False])
    assert loss_spcl(feats, labels, temperature=1.0, valid=valid).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_spcl_without_positives_is_zero_with_finite_gradients() -> None:
    feats = torch.randn(3, 4, requires_grad=True)
    loss = loss_spcl(feats, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()


def test_loss_rec_hand_case() -> None:
    # row 0 is a target with error (1, 2); row 1 is not (its target is NaN and must be ignored)
    x_hat = torch.tensor([[[1.0, 2.0]], [[3.0, 3.0]]])  # (B=2, T=1, C=2)
    x = torch.tensor([[[0.0, 0.0]], [[float("nan"), 0.0]]])
    target = torch.tensor([True, False])
    assert loss_rec(x_hat, x, target).item() == pytest.approx((1 + 4) / 2)  # mean over 2 elements
    assert loss_rec(x_hat, x, target, reduction="sum").item() == pytest.approx(5.0)  # per-row Frobenius^2
    # step mask: a second step with error 10 that is padding does not count
    x_hat2 = torch.cat([x_hat, torch.full((2, 1, 2), 10.0)], dim=1)
    x2 = torch.cat([x, torch.zeros(2, 1, 2)], dim=1)
    mask = torch.tensor([[True, False], [True, True]])
    assert loss_rec(x_hat2, x2, target, mask=mask).item() == pytest.approx(2.5)
    assert loss_rec(x_hat, x, torch.zeros(2, dtype=torch.bool)).item() == 0.0
    x_hat.requires_grad_(True)
    loss_rec(x_hat, x, target).backward()
    assert torch.isfinite(x_hat.grad).all()


def test_loss_nll_hand_case() -> None:
    # z = (1, 2), log|det| = 0.5, 2 dimensions:
    # (0.5 * (1 + 4) + 0.5 * 2 * log(2 pi) - 0.5) / 2 = (2 + log(2 pi)) / 2
    z = torch.tensor([[[1.0, 2.0]], [[50.0, 50.0]]])
    logdet = torch.tensor([0.5, -3.0])
    valid = torch.tensor([True, False])
    assert loss_nll(z, logdet, valid).item() == pytest.approx((2 + math.log(2 * math.pi)) / 2, rel=1e-6, abs=1e-6)
    # class-conditional prior: mean (1, 1) -> residual (0, 1): (0.5 + log(2 pi) - 0.5) / 2
    prior = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])
    assert (loss_nll(z, logdet, valid, prior_mean=prior).item()
            == pytest.approx(math.log(2 * math.pi) / 2, rel=1e-6, abs=1e-6))


def test_loss_cls_hand_case() -> None:
    # logits (0, log 3) -> p(class 1) = 3/4, CE = -log(3/4)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert loss_cls(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), rel=1e-6, abs=1e-6)


def test_total_loss_eq14() -> None:
    losses = {k: torch.tensor(v) for k, v in {"udcl": 1.0, "spcl": 2.0, "rec": 3.0, "nll": 4.0, "cls": 5.0}.items()}
    # 1.0 * 1 + 0.1 * 2 + 10 * 3 + 5 + 0.5 * 4 = 38.2
    got = total_loss(losses, alpha=1.0, beta=0.1, lambda_rec=10.0, nll_weight=0.5)
    assert got.item() == pytest.approx(38.2, rel=1e-6, abs=1e-6)
    with pytest.raises(KeyError):
        total_loss({"cls": torch.tensor(1.0)}, alpha=1.0, beta=0.1, lambda_rec=10.0, nll_weight=0.5)
