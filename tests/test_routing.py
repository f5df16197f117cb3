"""Tests of the top-k routers (dsmoe.moe.gates) against a brute-force python reference."""

from __future__ import annotations

import math

import pytest
import torch

from dsmoe.losses import load_balancing_loss
from dsmoe.moe.gates import DomainAwareRouter, LinearRouter, route_top_k


# ---------------------------------------------------------------- reference


def reference_routing(logits: torch.Tensor, k: int, capacity_factor: float | None = None) -> dict:
    """Top-k routing one token at a time, in plain python.

    Routes are placed route-major: every token's first choice takes its expert's next free slot before any
    second choice does. Without a capacity factor the capacity is the largest load (nothing dropped);
    with one, routes landing at slot >= capacity are dropped (expert -1).
    """
    rows = logits.tolist()
    num_tokens, num_experts = len(rows), len(rows[0])
    chosen = [sorted(range(num_experts), key=lambda e: -row[e])[:k] for row in rows]
    gates = []
    for row, experts in zip(rows, chosen):
        top = [row[e] for e in experts]
        m = max(top)
        z = sum(math.exp(v - m) for v in top)
        gates.append([math.exp(v - m) / z for v in top])
    counts = [0] * num_experts
    locations = [[0] * num_tokens for _ in range(k)]
    for r in range(k):
        for s in range(num_tokens):
            e = chosen[s][r]
            locations[r][s] = counts[e]
            counts[e] += 1
    if capacity_factor is None:
        capacity = max(counts)
    else:
        capacity = max(1, math.ceil(capacity_factor * k * num_tokens / num_experts))
    indices = [[chosen[s][r] if locations[r][s] < capacity else -1 for s in range(num_tokens)] for r in range(k)]
    probs = []
    for row in rows:
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        probs.append([math.exp(v - m) / z for v in row])
    lb = sum((sum(p[e] for p in probs) / num_tokens) * (sum(e in c for c in chosen) / num_tokens)
             for e in range(num_experts))
    return {"indices": indices, "locations": locations, "gates": [[gates[s][r] for s in range(num_tokens)]
                                                                  for r in range(k)],
            "counts": counts, "capacity": capacity, "lb": lb, "chosen": chosen}


def _logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- route_top_k


@pytest.mark.parametrize("tokens,experts,k", [(7, 4, 2), (23, 6, 2), (5, 3, 1), (12, 8, 3), (1, 4, 2)])
def test_route_top_k_matches_reference(tokens, experts, k):
    logits = _logits(tokens, experts, seed=tokens * 100 + experts)
    ref = reference_routing(logits, k)
    lb, capacity, num_experts, indices, locations, gates, counts = route_top_k(logits, k)

    assert num_experts == experts
    assert indices.shape == (k, tokens) and locations.shape == (k, tokens) and gates.shape == (k, tokens)
    assert indices.tolist() == ref["indices"]
    assert locations.tolist() == ref["locations"]
    torch.testing.assert_close(gates, torch.tensor(ref["gates"]), rtol=1e-6, atol=1e-6)
    assert counts.tolist() == ref["counts"]
    assert int(capacity) == ref["capacity"] == max(ref["counts"])
    # nothing dropped: every route has an expert and a slot inside the buffer
    assert bool((indices >= 0).all()) and bool((locations < int(capacity)).all())
    assert int(counts.sum()) == tokens * k
    assert float(lb.detach()) == pytest.approx(ref["lb"], rel=1e-5)


def test_locations_are_route_major_and_slots_are_dense():
    # Every token prefers expert 0, then expert 1: first choices fill expert 0's slots 0..S-1, and the
    # second choices fill expert 1's slots 0..S-1 (no interleaving by token).
    tokens = 5
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * tokens) + torch.linspace(0, 0.1, tokens)[:, None]
    _, capacity, _, indices, locations, gates, counts = route_top_k(logits, 2)
    assert indices.tolist() == [[0] * tokens, [1] * tokens]
    assert locations.tolist() == [list(range(tokens)), list(range(tokens))]
    assert counts.tolist() == [tokens, tokens, 0, 0]
    assert int(capacity) == tokens
    # gates: softmax over the two selected logits (3 and 2 shifted equally)
    expected_first = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(gates[0], torch.full((tokens,), expected_first))
    torch.testing.assert_close(gates.sum(0), torch.ones(tokens))

    # Mixed preferences: each expert's slots are exactly 0..count-1 across both route ranks.
    logits = _logits(40, 6, seed=3)
    _, _, _, indices, locations, _, counts = route_top_k(logits, 2)
    for e in range(6):
        slots = sorted(locations[indices == e].tolist())
        assert slots == list(range(int(counts[e])))
    # A first choice always sits before any second choice of the same expert.
    for e in range(6):
        first = locations[0][indices[0] == e]
        second = locations[1][indices[1] == e]
        if len(first) and len(second):
            assert int(first.max()) < int(second.min())


def test_capacity_is_at_least_one_when_an_expert_is_empty():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    _, capacity, _, indices, _, _, counts = route_top_k(logits, 1)
    assert counts.tolist() == [1, 0, 0] and int(capacity) == 1 and indices.tolist() == [[0]]


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
def test_capacity_factor_drops_routes_beyond_capacity(capacity_factor):
    tokens, experts, k = 24, 4, 2
    # Skewed logits so that some expert is over-subscribed.
    logits = _logits(tokens, experts, seed=11) + torch.tensor([2.0, 1.0, 0.0, 0.0])
    ref = reference_routing(logits, k, capacity_factor)
    _, capacity, _, indices, locations, gates, counts = route_top_k(logits, k, capacity_factor=capacity_factor)

    expected_capacity = max(1, math.ceil(capacity_factor * k * tokens / experts))
    assert int(capacity) == expected_capacity == ref["capacity"]
    assert indices.tolist() == ref["indices"]
    assert locations.tolist() == ref["locations"]
    torch.testing.assert_close(gates, torch.tensor(ref["gates"]), rtol=1e-6, atol=1e-6)
    kept = indices >= 0
    assert bool((locations[kept] < int(capacity)).all())
    assert bool((locations[~kept] >= int(capacity)).all())
    for e in range(experts):
        assert int((indices == e).sum()) <= int(capacity)
        assert int((indices == e).sum()) == min(ref["counts"][e], int(capacity))
    # The skew over-subscribes expert 0 beyond every one of these capacities: something is dropped.
    assert int((~kept).sum()) > 0
    # The load-balancing statistics still count the whole top-k (before dropping).
    assert counts.tolist() == ref["counts"]


def test_lb_loss_equals_load_balancing_loss_and_has_gradient():
    logits = _logits(30, 6, seed=5).requires_grad_(True)
    lb, *_ = route_top_k(logits, 2)
    expected = load_balancing_loss(torch.softmax(logits.detach(), -1), logits.detach().topk(2, -1).indices, 6)
    torch.testing.assert_close(lb.detach(), expected)
    lb.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_gates_carry_gradient_to_logits():
    logits = _logits(10, 4, seed=6).requires_grad_(True)
    _, _, _, _, _, gates, _ = route_top_k(logits, 2)
    (gates[0] * torch.arange(10.0)).sum().backward()
    assert float(logits.grad.abs().sum()) > 0


# ---------------------------------------------------------------- routers


def _tokens(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router_cls", [LinearRouter, DomainAwareRouter])
def test_router_is_deterministic_without_noise(router_cls):
    torch.manual_seed(0)
    router = router_cls(16, 6, 2, None)
    x = _tokens(50, 16)
    router.train()
    first = router(x, None, True, False)
    second = router(x, None, True, False)
    router.eval()
    third = router(x, None, True, False)
    for a, b, c in zip(first, second, third):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and torch.equal(a, c)
        else:
            assert a == b == c


def test_linear_router_routes_on_x_wg():
    torch.manual_seed(1)
    router = LinearRouter(8, 4, 2, None)
    x = _tokens(20, 8, seed=1)
    logits = x @ router.wg.weight.t()
    torch.testing.assert_close(router.logits(x), logits)
    out = router(x, None, True, False)
    ref = reference_routing(logits, 2)
    assert out[3].tolist() == ref["indices"]
    assert out[6].tolist() == ref["counts"]
    torch.testing.assert_close(out[5], torch.tensor(ref["gates"]), rtol=1e-5, atol=1e-6)
    assert float(out[0].detach()) == pytest.approx(ref["lb"], rel=1e-5)


def test_domain_aware_router_initial_state():
    router = DomainAwareRouter(12, 6, 2)
    assert router.mix.shape == (1,) and float(router.mix.detach()) == 0.5
    assert router.domain_prompt.shape == (12,)
    assert router.domain_proj.weight.shape == (6, 12) and router.domain_proj.bias is None
    assert router.wg.weight.shape == (6, 12) and router.wg.bias is None
    assert router.k == 2


def test_domain_aware_logits_by_hand():
    torch.manual_seed(2)
    dim, experts = 10, 6
    router = DomainAwareRouter(dim, experts, 2)
    with torch.no_grad():
        router.mix.fill_(0.3)  # not the init value, so (1 - a) and a are distinguishable
    x = _tokens(15, dim, seed=2)
    a = 0.3
    w_in, w_d, p = router.wg.weight.detach(), router.domain_proj.weight.detach(), router.domain_prompt.detach()
    by_hand = torch.tensor([[(1 - a) * sum(float(x[s, j]) * float(w_in[e, j]) for j in range(dim))
                             + a * sum(float(p[j]) * float(w_d[e, j]) for j in range(dim))
                             for e in range(experts)] for s in range(len(x))])
    torch.testing.assert_close(router.logits(x), by_hand, rtol=1e-5, atol=1e-5)

    ref = reference_routing(by_hand, 2)
    lb, capacity, _, indices, locations, gates, counts = router(x, None, True, False)
    assert indices.tolist() == ref["indices"] and locations.tolist() == ref["locations"]
    assert counts.tolist() == ref["counts"] and int(capacity) == ref["capacity"]
    torch.testing.assert_close(gates, torch.tensor(ref["gates"]), rtol=1e-5, atol=1e-5)
    assert float(lb.detach()) == pytest.approx(ref["lb"], rel=1e-5)


def test_domain_aware_router_reduced_precision_input_routes_in_float32():
    torch.manual_seed(3)
    router = DomainAwareRouter(16, 4, 2)
    x = _tokens(12, 16, seed=3).bfloat16()
    out_bf16 = router(x, None, True, False)
    out_fp32 = router(x.float(), None, True, False)
    assert out_bf16[5].dtype == torch.float32
    assert torch.equal(out_bf16[3], out_fp32[3]) and torch.equal(out_bf16[5], out_fp32[5])


def test_gradient_reaches_every_domain_aware_parameter():
    torch.manual_seed(4)
    router = DomainAwareRouter(16, 6, 2)
    x = _tokens(40, 16, seed=4)
    lb, _, _, _, _, gates, _ = router(x, None, True, False)
    weights = torch.linspace(-1.0, 1.0, gates.numel()).view_as(gates)
    (lb + (gates * weights).sum()).backward()
    for name in ("wg.weight", "domain_proj.weight", "domain_prompt", "mix"):
        grad = dict(router.named_parameters())[name].grad
        assert grad is not None, name
        assert float(grad.abs().sum()) > 0, name
