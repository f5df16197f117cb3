"""Tests of dsmoe.losses against explicit element-by-element references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsmoe.losses import load_balancing_loss, sdm_loss, symmetric_info_nce


# ---------------------------------------------------------------- references


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def ref_sdm_halves(
    img: np.ndarray, txt: np.ndarray, pids: list[int], scale: float, eps: float = 1e-8
) -> tuple[float, float]:
    """(text-to-image, image-to-text) terms of SDM, one element at a time."""
    img, txt = _normalise(img.astype(np.float64)), _normalise(txt.astype(np.float64))
    b = len(pids)

    def direction(queries: np.ndarray, keys: np.ndarray) -> float:
        total = 0.0
        for i in range(b):
            logits = [scale * float(np.dot(queries[i], keys[j])) for j in range(b)]
            m = max(logits)
            log_z = m + math.log(sum(math.exp(v - m) for v in logits))
            n_same = sum(1 for j in range(b) if pids[j] == pids[i])
            row = 0.0
            for j in range(b):
                log_p = logits[j] - log_z
                q = (1.0 if pids[j] == pids[i] else 0.0) / n_same
                row += math.exp(log_p) * (log_p - math.log(q + eps))
            total += row
        return total / b

    return direction(txt, img), direction(img, txt)


def ref_sdm(img: np.ndarray, txt: np.ndarray, pids: list[int], scale: float, eps: float = 1e-8) -> float:
    return sum(ref_sdm_halves(img, txt, pids, scale, eps))


def ref_info_nce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    a, b = _normalise(a.astype(np.float64)), _normalise(b.astype(np.float64))
    n = a.shape[0]

    def ce(x: np.ndarray, y: np.ndarray) -> float:
        total = 0.0
        for i in range(n):
            logits = [scale * float(np.dot(x[i], y[j])) for j in range(n)]
            m = max(logits)
            total += m + math.log(sum(math.exp(v - m) for v in logits)) - logits[i]
        return total / n

    return (ce(a, b) + ce(b, a)) / 2


# ---------------------------------------------------------------- sdm_loss


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_sdm_matches_loop_reference(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=gen)
    txt = torch.randn(8, 16, generator=gen) * 3.0  # not normalised on purpose
    pids = [0, 1, 1, 2, 3, 3, 3, 4]
    got = sdm_loss(img, txt, torch.tensor(pids), logit_scale=scale)
    assert got.dim() == 0 and got.dtype == torch.float32
    t2i, i2t = ref_sdm_halves(img.numpy(), txt.numpy(), pids, scale)
    assert float(got) == pytest.approx(t2i + i2t, rel=1e-4, abs=1e-5)
    # The halves differ here, so an implementation with one direction only (or twice one) would fail.
    assert abs(t2i - i2t) > 1e-3 * (t2i + i2t)  # 10x the tolerance above


def test_sdm_hand_computed() -> None:
    # Two people, orthonormal features, scale 1: each direction has logits [1, 0] / [0, 1], target one-hot.
    # Row loss = p*log p + (1-p)*(log(1-p) - log(1e-8)) with p = e/(1+e); both rows and both directions equal.
    eye = torch.eye(2)
    got = sdm_loss(eye, eye, torch.tensor([5, 9]), logit_scale=1.0)
    p = math.e / (1 + math.e)
    row = p * (math.log(p) - math.log(1 + 1e-8)) + (1 - p) * (math.log(1 - p) - math.log(1e-8))
    assert float(got) == pytest.approx(2 * row, rel=1e-5)
    assert float(got) == pytest.approx(8.7438, abs=1e-3)


def test_sdm_zero_when_aligned_per_identity() -> None:
    # Same-identity features identical, identities orthogonal, large scale: softmax equals q, so KL ~ 0.
    # (A cross-entropy against q instead of a KL would give log 2 per row here.)
    basis = torch.eye(3, 8)
    pids = torch.tensor([0, 0, 1, 2, 2])
    feats = basis[pids]
    got = sdm_loss(feats, feats, pids, logit_scale=50.0)
    assert abs(float(got)) < 1e-5


def test_sdm_symmetric_under_swap_and_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    pids = torch.tensor([0, 0, 1, 2, 1, 3])
    base = sdm_loss(img, txt, pids)
    assert torch.allclose(base, sdm_loss(txt, img, pids), atol=1e-6)
    assert torch.allclose(base, sdm_loss(img * 7.0, txt * 0.1, pids), atol=1e-5)


def test_sdm_gradient_and_low_precision() -> None:
    gen = torch.Generator().manual_seed(2)
    img = torch.randn(4, 8, generator=gen, requires_grad=True)
    txt = torch.randn(4, 8, generator=gen, requires_grad=True)
    pids = torch.tensor([1, 2, 1, 3])
    loss = sdm_loss(img, txt, pids)
    loss.backward()
    assert img.grad is not None and txt.grad is not None
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    low = sdm_loss(img.detach().bfloat16(), txt.detach().bfloat16(), pids)
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(loss.item(), rel=5e-2)


def test_sdm_errors() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        sdm_loss(x, torch.randn(4, 6), torch.arange(4))
    with pytest.raises(ValueError, match="person_ids"):
        sdm_loss(x, x, torch.arange(3))
    with pytest.raises(ValueError, match="2-D"):
        sdm_loss(torch.randn(8), torch.randn(8), torch.arange(8))


# ---------------------------------------------------------------- load_balancing_loss


def _balanced_routing(num_tokens: int, num_experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    idx = torch.stack([(torch.arange(num_tokens) + j) % num_experts for j in range(k)], dim=1)
    return probs, idx


def test_lb_perfect_balance_is_k_over_e() -> None:
    probs, idx = _balanced_routing(12, 6, 2)
    value = load_balancing_loss(probs, idx, 6)
    assert float(value) == pytest.approx(2 / 6, abs=1e-7)
    # the paper's setting: weight 0.5, summed over 24 layers, at balance: about 4.0.
    assert float(sum(0.5 * load_balancing_loss(probs, idx, 6) for _ in range(24))) == pytest.approx(4.0, abs=1e-5)
    probs, idx = _balanced_routing(8, 4, 1)
    assert float(load_balancing_loss(probs, idx, 4)) == pytest.approx(1 / 4, abs=1e-7)


def test_lb_hand_computed_skewed() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.2, 0.7, 0.1]])
    idx = torch.tensor([[0], [0], [0], [1]])
    # P = [0.5, 0.3625, 0.1375], f = [0.75, 0.25, 0]  ->  0.375 + 0.090625
    assert float(load_balancing_loss(probs, idx, 3)) == pytest.approx(0.465625, abs=1e-6)
    # Top-2: every token picks {0, 1}: f = [1, 1, 0], P = [0.5, 0.3625, 0.1375] -> 0.8625
    idx2 = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    assert float(load_balancing_loss(probs, idx2, 3)) == pytest.approx(0.8625, abs=1e-6)


def test_lb_collapse_is_worse_than_balance() -> None:
    probs = torch.zeros(10, 6)
    probs[:, :2] = 0.5
    idx = torch.tensor([[0, 1]] * 10)
    assert float(load_balancing_loss(probs, idx, 6)) == pytest.approx(1.0)
    assert float(load_balancing_loss(probs, idx, 6)) > float(load_balancing_loss(*_balanced_routing(12, 6, 2), 6))


def test_lb_gradient_flows_through_probs_only() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 6, generator=gen, requires_grad=True)
    probs = logits.softmax(dim=-1)
    probs.retain_grad()
    idx = logits.topk(2, dim=-1).indices
    loss = load_balancing_loss(probs, idx, 6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # d loss / d probs[s, e] = f_e / S
    f = torch.zeros(6)
    for row in idx.tolist():
        for e in row:
            f[e] += 1.0 / 20
    assert float(f.sum()) == pytest.approx(2.0)
    assert torch.allclose(probs.grad, (f / 20).expand(20, 6), atol=1e-7)


def test_lb_low_precision_input() -> None:
    probs, idx = _balanced_routing(12, 6, 2)
    value = load_balancing_loss(probs.bfloat16(), idx.int(), 6)
    assert value.dtype == torch.float32 and float(value) == pytest.approx(1 / 3, rel=1e-2)


def test_lb_errors() -> None:
    probs, idx = _balanced_routing(6, 6, 2)
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(probs, idx, 5)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        load_balancing_loss(probs, idx + 1, 6)
    with pytest.raises(ValueError, match="integer"):
        load_balancing_loss(probs, idx.float(), 6)
    with pytest.raises(ValueError, match="tokens"):
        load_balancing_loss(probs, idx[:3], 6)
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(probs, idx, 0)


# ---------------------------------------------------------------- symmetric_info_nce


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_info_nce_matches_manual(scale: float) -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(7, 12, generator=gen)
    b = a + 0.8 * torch.randn(7, 12, generator=gen)
    got = symmetric_info_nce(a, b, logit_scale=scale)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert float(got) == pytest.approx(ref_info_nce(a.numpy(), b.numpy(), scale), rel=1e-4, abs=1e-5)
    assert torch.allclose(got, symmetric_info_nce(b, a, logit_scale=scale), atol=1e-5)


def test_info_nce_hand_computed_and_gradient() -> None:
    # Orthonormal pairs, scale 1: logits = I, each CE = log(e + (n-1)) - 1 in both directions.
    n = 3
    got = symmetric_info_nce(torch.eye(n), torch.eye(n) * 2.0, logit_scale=1.0)
    assert float(got) == pytest.approx(math.log(math.e + n - 1) - 1, rel=1e-6)
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    symmetric_info_nce(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is not None and b.grad.abs().sum() > 0


def test_info_nce_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        symmetric_info_nce(torch.randn(4, 8), torch.randn(3, 8))
