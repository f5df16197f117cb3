"""Tests of the adapter branch on DeepSpeed's MoE layer, the frozen CLIP backbone, DM-Adapter and the
engine's optimiser / schedule / checkpoint helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsmoe.backbones.clip import FrozenCLIP, resize_position_embedding
from dsmoe.config import AdapterConfig, RunConfig, run_config_from_dict
from dsmoe.data.text import CaptionEncoder
from dsmoe.losses import load_balancing_loss, sdm_loss
from dsmoe.moe.adapter import AdapterBranch, BottleneckExpert
from dsmoe.moe.layer import expert_parallel_rank, expert_seed
from dsmoe.moe.gates import DomainAwareRouter, LinearRouter

DIM = 16
# The tiny CLIP of conftest.py: 16x16 images in 8x8 patches, hidden 32, two blocks per encoder.
TINY_IMAGE = 16
LONG_CAPTIONS = [  # longer than the 10- and 12-token lengths used below: they get truncated
    "a woman in a red top and black trousers carries a blue backpack",
    "the man wears a green shirt with white shorts and a yellow hat",
    "a person in an orange jacket over purple skirt walks with a handbag",
]


def _adapter_cfg(**kw) -> AdapterConfig:
    base = dict(num_experts=4, top_k=2, ep_size=1, bottleneck_ratio=4)
    base.update(kw)
    return AdapterConfig(**base)


def _experts(branch: AdapterBranch) -> list[BottleneckExpert]:
    return list(branch.moe.deepspeed_moe.experts.deepspeed_experts)


def _randomise_up(branch: AdapterBranch, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert in _experts(branch):
            expert.up.weight.copy_(torch.randn(expert.up.weight.shape, generator=g))
            expert.up.bias.copy_(torch.randn(expert.up.bias.shape, generator=g))


def _brute_force(branch: AdapterBranch, x: torch.Tensor, capacity_factor: float | None = None) -> torch.Tensor:
    """sum over each token's top-k experts of gate * expert(norm(x)), token by token (kept routes only)."""
    gate = branch.moe.deepspeed_moe.gate
    experts = _experts(branch)
    tokens = branch.norm(x).reshape(-1, x.shape[-1])
    logits = gate.logits(tokens.float())
    k, num_experts = gate.k, len(experts)
    top = logits.topk(k, dim=-1)
    weights = torch.softmax(top.values, dim=-1)
    capacity = None
    if capacity_factor is not None:
        capacity = max(1, math.ceil(capacity_factor * k * len(tokens) / num_experts))
    load = [0] * num_experts
    out = torch.zeros_like(tokens)
    for r in range(k):  # route-major, as the slots are assigned
        for s in range(len(tokens)):
            e = int(top.indices[s, r])
            load[e] += 1
            if capacity is not None and load[e] > capacity:
                continue
            out[s] += weights[s, r] * experts[e](tokens[s])
    return out.view_as(x)


# ---------------------------------------------------------------- adapter branch on DeepSpeed's MoE


@pytest.mark.parametrize("router", ["domain_aware", "linear"])
def test_branch_equals_brute_force_mixture(wire, router):
    torch.manual_seed(0)
    branch = wire(AdapterBranch(DIM, _adapter_cfg(router=router), "image.0", seed=1))
    assert isinstance(branch.moe.deepspeed_moe.gate, {"domain_aware": DomainAwareRouter, "linear": LinearRouter}[router])
    _randomise_up(branch)
    x = torch.randn(3, 5, DIM)
    with torch.no_grad():
        out = branch(x)
        expected = _brute_force(branch, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # every token reached both of its experts: the counts are the whole top-2, nothing dropped
    counts = branch.expert_counts
    assert int(counts.sum()) == 15 * 2
    tokens = branch.norm(x).reshape(-1, DIM)
    logits = branch.moe.deepspeed_moe.gate.logits(tokens).detach()
    top = logits.topk(2, dim=-1).indices
    assert counts.tolist() == torch.bincount(top.reshape(-1), minlength=4).tolist()
    expected_lb = load_balancing_loss(torch.softmax(logits, -1), top, 4)
    torch.testing.assert_close(branch.lb_loss.detach(), expected_lb)


def test_branch_with_capacity_factor_adds_nothing_for_dropped_routes(wire):
    torch.manual_seed(1)
    branch = wire(AdapterBranch(DIM, _adapter_cfg(capacity_factor=0.5), "text.0", seed=1))
    _randomise_up(branch, seed=1)
    x = torch.randn(2, 6, DIM)
    with torch.no_grad():
        out = branch(x)
        expected = _brute_force(branch, x, capacity_factor=0.5)
        unlimited = _brute_force(branch, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, unlimited), "capacity 0.5 x k x S / E must drop something here"


def test_branch_output_is_exactly_zero_at_init(wire):
    torch.manual_seed(2)
    branch = wire(AdapterBranch(DIM, _adapter_cfg(), "image.3", seed=7))
    for expert in _experts(branch):
        assert torch.count_nonzero(expert.up.weight) == 0 and torch.count_nonzero(expert.up.bias) == 0
        assert torch.count_nonzero(expert.down.bias) == 0
        assert expert.down.weight.shape == (DIM // 4, DIM)
    x = torch.randn(2, 7, DIM)
    out = branch(x)
    assert torch.equal(out, torch.zeros_like(x))
    # the routing still ran: counts and a positive load-balancing loss
    assert int(branch.expert_counts.sum()) == 14 * 2
    assert float(branch.lb_loss.detach()) > 0


def test_experts_are_initialised_independently_and_deterministically():
    torch.manual_seed(3)
    a = AdapterBranch(DIM, _adapter_cfg(), "image.0", seed=5)
    torch.manual_seed(99)  # the global RNG must not matter for the experts
    b = AdapterBranch(DIM, _adapter_cfg(), "image.0", seed=5)
    other_branch = AdapterBranch(DIM, _adapter_cfg(), "image.1", seed=5)
    other_seed = AdapterBranch(DIM, _adapter_cfg(), "image.0", seed=6)
    downs = [e.down.weight.detach() for e in _experts(a)]
    assert len(downs) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(downs[i], downs[j]), f"experts {i} and {j} start identical"
    for ea, eb in zip(_experts(a), _experts(b)):
        assert torch.equal(ea.down.weight, eb.down.weight)
    for ea, eo, es in zip(_experts(a), _experts(other_branch), _experts(other_seed)):
        assert not torch.equal(ea.down.weight, eo.down.weight)
        assert not torch.equal(ea.down.weight, es.down.weight)
    # Kaiming-uniform bound of nn.Linear: 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(DIM)
    assert all(float(w.abs().max()) <= bound for w in downs)


def test_expert_init_is_independent_of_the_expert_parallel_layout(monkeypatch):
    """With ep_size 2, rank r holds global experts 2r, 2r+1 and must initialise them as ep_size 1 does."""
    monkeypatch.setenv("RANK", "0")
    full = AdapterBranch(DIM, _adapter_cfg(ep_size=1), "text.1", seed=3)
    reference = [e.down.weight for e in _experts(full)]
    for rank in (0, 1, 2, 3):
        monkeypatch.setenv("RANK", str(rank))
        assert expert_parallel_rank(2) == rank % 2
        shard = AdapterBranch(DIM, _adapter_cfg(ep_size=2), "text.1", seed=3)
        local = _experts(shard)
        assert len(local) == 2
        first = (rank % 2) * 2
        for i, expert in enumerate(local):
            assert torch.equal(expert.down.weight, reference[first + i]), (rank, i)
    assert expert_seed(3, "text.1", 2) == expert_seed(3, "text.1", 2)
    assert len({expert_seed(3, "text.1", e) for e in range(4)}) == 4


def test_only_expert_parameters_carry_expert_in_their_name():
    """DeepSpeed moves keys containing 'expert' to per-expert files and drops them from the main state."""
    branch = AdapterBranch(DIM, _adapter_cfg(), "image.0", seed=1)
    names = dict(branch.named_parameters())
    expert_names = {n for n in names if "expert" in n}
    expert_params = {id(p) for e in _experts(branch) for p in e.parameters()}
    assert expert_names and {id(names[n]) for n in expert_names} == expert_params
    for gate_param in ("moe.deepspeed_moe.gate.wg.weight", "moe.deepspeed_moe.gate.domain_proj.weight",
                       "moe.deepspeed_moe.gate.domain_prompt", "moe.deepspeed_moe.gate.mix"):
        assert gate_param in names
        assert getattr(names[gate_param], "allreduce", True), "router parameters are data-parallel"
    assert all(getattr(names[n], "allreduce", True) is False for n in expert_names)


def test_dense_branch_is_zero_at_init_with_zero_routing_loss():
    torch.manual_seed(4)
    branch = AdapterBranch(DIM, _adapter_cfg(router="dense"), "text.0", seed=1)
    assert branch.moe is None and isinstance(branch.adapter, BottleneckExpert)
    x = torch.randn(2, 3, DIM)
    out = branch(x)
    assert torch.equal(out, torch.zeros_like(x))
    assert float(branch.lb_loss) == 0.0 and branch.expert_counts is None
    # it is a real adapter once the up-projection is non-zero
    with torch.no_grad():
        branch.adapter.up.weight.normal_()
    expected = branch.adapter.up(torch.relu(branch.adapter.down(branch.norm(x))))
    torch.testing.assert_close(branch(x), expected)


# ---------------------------------------------------------------- frozen CLIP backbone


def test_encode_image_matches_transformers(tiny_clip):
    assert tiny_clip.config.vision_config.image_size == TINY_IMAGE
    backbone = FrozenCLIP(tiny_clip, (TINY_IMAGE, TINY_IMAGE))
    pixels = torch.randn(3, 3, TINY_IMAGE, TINY_IMAGE)
    with torch.no_grad():
        ours = backbone.encode_image(pixels)
        reference = tiny_clip.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (3, tiny_clip.config.projection_dim)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_encode_text_matches_transformers(tiny_clip, tiny_tokenizer):
    backbone = FrozenCLIP(tiny_clip, (TINY_IMAGE, TINY_IMAGE))
    encoder = CaptionEncoder(tiny_tokenizer, 10)
    captions = ["a red top", LONG_CAPTIONS[0], LONG_CAPTIONS[1], ""]  # short, truncated, truncated, empty
    encoded = encoder.encode(captions)
    assert encoded.eot.tolist()[0] == 4 and encoded.eot.tolist()[1] == 9 and encoded.eot.tolist()[3] == 1
    with torch.no_grad():
        ours = backbone.encode_text(encoded.ids, encoded.eot)
        reference = tiny_clip.get_text_features(input_ids=encoded.ids).pooler_output
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_clip_is_frozen_and_stays_in_eval_mode(tiny_clip):
    backbone = FrozenCLIP(tiny_clip, (24, 16))
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training and not backbone.clip.training
    assert all(not m.training for m in backbone.clip.modules())


def test_non_multiple_of_patch_image_size_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="patch"):
        FrozenCLIP(tiny_clip, (20, 16))
    with pytest.raises(ValueError, match="patch"):
        FrozenCLIP(tiny_clip, (16, 12))


def test_resize_position_embedding_identity_for_the_same_grid():
    pos = torch.randn(1 + 16, 8)
    out = resize_position_embedding(pos, (4, 4))
    assert torch.equal(out, pos) and out.data_ptr() != pos.data_ptr()


@pytest.mark.parametrize("grid", [(6, 3), (2, 2), (8, 4)])
def test_resize_position_embedding_is_bilinear_on_the_grid(grid):
    side, dim = 4, 8
    pos = torch.randn(1 + side * side, dim)
    out = resize_position_embedding(pos, grid)
    assert out.shape == (1 + grid[0] * grid[1], dim)
    assert torch.equal(out[0], pos[0]), "the class-token row is kept as is"
    image = pos[1:].reshape(side, side, dim).permute(2, 0, 1).unsqueeze(0)  # [1, d, rows, cols]
    expected = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)[0]  # [d, r, c]
    # row-major patch order: patch (i, j) is row 1 + i * cols + j
    for i in range(grid[0]):
        for j in range(grid[1]):
            torch.testing.assert_close(out[1 + i * grid[1] + j], expected[:, i, j])


def test_non_square_backbone_uses_the_resized_positions(tiny_clip):
    backbone = FrozenCLIP(tiny_clip, (24, 16))
    assert backbone.grid == (3, 2)
    pos = tiny_clip.vision_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(backbone.image_positions, resize_position_embedding(pos, (3, 2)))
    with torch.no_grad():
        out = backbone.encode_image(torch.randn(2, 3, 24, 16))
    assert out.shape == (2, tiny_clip.config.projection_dim) and torch.isfinite(out).all()


# ---------------------------------------------------------------- DM-Adapter


def _run_config(clip_dir, **adapter) -> RunConfig:
    return run_config_from_dict({
        "model": {"clip": str(clip_dir), "image_size": [24, 16], "text_length": 12},
        "adapter": {"num_experts": 4, "top_k": 2, "ep_size": 1, "bottleneck_ratio": 4, **adapter},
        "data": {"shards": "unused"},
        "train": {"seed": 3},
    })


@pytest.fixture
def dm_model(tiny_clip_dir, wire):
    from dsmoe.methods.dm_adapter.method import DMAdapterMethod

    cfg = _run_config(tiny_clip_dir)
    method = DMAdapterMethod(cfg)
    return cfg, wire(method.build()), method.captions


def _batch(encoder: CaptionEncoder, size=(24, 16)) -> dict:
    torch.manual_seed(11)
    captions = ["a red top", LONG_CAPTIONS[0], "blue jeans and a black coat", LONG_CAPTIONS[2]]
    encoded = encoder.encode(captions)
    return {"image": torch.randn(4, 3, *size), "text": encoded.ids, "eot": encoded.eot,
            "pid": torch.tensor([0, 0, 1, 2])}


def test_dm_adapter_starts_as_the_frozen_backbone(dm_model):
    _, model, encoder = dm_model
    batch = _batch(encoder)
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["image"]), model.backbone.encode_image(batch["image"]))
        assert torch.equal(model.encode_text(batch["text"], batch["eot"]),
                           model.backbone.encode_text(batch["text"], batch["eot"]))


def test_dm_adapter_changes_features_once_adapters_are_non_zero(dm_model):
    _, model, encoder = dm_model
    for branch in model.branches().values():
        _randomise_up(branch)
    batch = _batch(encoder)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(batch["image"]), model.backbone.encode_image(batch["image"]))
        assert not torch.allclose(model.encode_text(batch["text"], batch["eot"]),
                                  model.backbone.encode_text(batch["text"], batch["eot"]))


def test_dm_adapter_loss_is_sdm_plus_weighted_lb_over_all_layers(dm_model):
    cfg, model, encoder = dm_model
    assert set(model.branches()) == {"image.0", "image.1", "text.0", "text.1"}
    routed: dict[str, torch.Tensor] = {}
    for name, branch in model.branches().items():
        branch.moe.deepspeed_moe.gate.register_forward_hook(
            lambda module, args, output, name=name: routed.__setitem__(name, args[0].detach()))
    batch = _batch(encoder)
    out = model(batch)
    assert set(routed) == set(model.branches())

    expected_lb = torch.zeros(())
    for name, tokens in routed.items():
        gate = model.branches()[name].moe.deepspeed_moe.gate
        logits = gate.logits(tokens.float()).detach()
        expected_lb = expected_lb + load_balancing_loss(torch.softmax(logits, -1), logits.topk(2, -1).indices, 4)
    with torch.no_grad():
        expected_sdm = sdm_loss(model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["eot"]),
                                batch["pid"], logit_scale=cfg.method_config.logit_scale)
    torch.testing.assert_close(out["lb"], expected_lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["sdm"], expected_sdm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), expected_sdm + cfg.method_config.lb_weight * expected_lb,
                               rtol=1e-5, atol=1e-6)
    # each layer's loss is between k/E (balanced) and 1 (collapsed)
    for branch in model.branches().values():
        assert 2 / 4 - 1e-6 <= float(branch.lb_loss.detach()) <= 1 + 1e-6


def test_expert_counts_sum_to_tokens_times_k(dm_model):
    _, model, encoder = dm_model
    batch = _batch(encoder)
    with torch.no_grad():
        model(batch)
    counts = model.expert_counts()
    image_tokens = 4 * (1 + 3 * 2)  # CLS + a 3x2 grid for 24x16 images with patch 8
    text_tokens = 4 * 12
    assert set(counts) == {"image.0", "image.1", "text.0", "text.1"}
    for name, per_expert in counts.items():
        assert len(per_expert) == 4
        assert sum(per_expert.tolist()) == 2 * (image_tokens if name.startswith("image") else text_tokens), name


def test_only_adapter_parameters_are_trainable(dm_model):
    _, model, _ = dm_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(n.startswith(("image_adapters.", "text_adapters.")) for n in trainable)
    assert all(n.startswith("backbone.") for n in frozen)
    assert {n for n, _ in model.backbone.named_parameters(prefix="backbone")} == frozen
    for branch in ("image_adapters.0", "text_adapters.1"):
        for part in ("norm.weight", "moe.deepspeed_moe.gate.wg.weight", "moe.deepspeed_moe.gate.mix",
                     "moe.deepspeed_moe.gate.domain_prompt", "moe.deepspeed_moe.experts.deepspeed_experts.3.up.weight"):
            assert f"{branch}.{part}" in trainable


def test_backward_and_adam_step_change_only_trainable_parameters(dm_model):
    _, model, encoder = dm_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    out = model(_batch(encoder))
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "an optimiser step must move the adapters"
    assert all(not n.startswith("backbone.") for n in changed), sorted(changed)[:5]
    # the routers learn from the load-balancing loss, the up-projections from SDM
    for prefix in ("image_adapters.0", "text_adapters.1"):
        gate = f"{prefix}.moe.deepspeed_moe.gate"
        assert {f"{gate}.wg.weight", f"{gate}.domain_proj.weight", f"{gate}.domain_prompt", f"{gate}.mix"} <= changed
        assert any(n.startswith(f"{prefix}.moe.deepspeed_moe.experts") and n.endswith("up.weight") for n in changed)


def test_dense_dm_adapter_has_zero_routing_loss(tiny_clip_dir):
    from dsmoe.methods.dm_adapter.method import DMAdapterMethod

    method = DMAdapterMethod(_run_config(tiny_clip_dir, router="dense"))
    model = method.build()
    out = model(_batch(method.captions))
    assert float(out["lb"]) == 0.0
    torch.testing.assert_close(out["loss"].detach(), out["sdm"])
    assert model.expert_counts() == {}


# ---------------------------------------------------------------- engine helpers


def test_lr_factor_warmup_then_cosine():
    from dsmoe.optim import lr_factor

    warmup, total, start = 10, 110, 0.1
    assert lr_factor(0, warmup, total, start) == pytest.approx(start)
    assert lr_factor(5, warmup, total, start) == pytest.approx(start + (1 - start) * 0.5)
    assert lr_factor(warmup, warmup, total, start) == pytest.approx(1.0)
    assert lr_factor(60, warmup, total, start) == pytest.approx(0.5)
    assert lr_factor(total, warmup, total, start) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total + 50, warmup, total, start) == pytest.approx(0.0, abs=1e-12)
    warm = [lr_factor(s, warmup, total, start) for s in range(warmup + 1)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    decay = [lr_factor(s, warmup, total, start) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # no warm-up: full rate at step 0
    assert lr_factor(0, 0, 100, start) == pytest.approx(1.0)


def _groups_by_name(model, groups) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return ({names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]})


def test_param_groups_follow_the_release_only_biases_skip_decay(dm_model):
    """IRRA's solver (DM-Adapter's release): lr x bias_lr_factor and no weight decay for parameters named *bias*
    only; LayerNorm weights, the domain prompt and the mixing scalar keep the base lr and the decay."""
    from dsmoe.optim import param_groups

    cfg, model, _ = dm_model
    groups = param_groups(model, cfg.optim)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert no_decay["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.bias_lr_factor)
    assert "lr" not in decay or decay["lr"] == pytest.approx(cfg.optim.lr)
    in_decay, in_no_decay = _groups_by_name(model, groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not in_decay & in_no_decay and in_decay | in_no_decay == trainable
    assert in_no_decay == {n for n in trainable if n.endswith(".bias")}
    gate = "image_adapters.0.moe.deepspeed_moe.gate"
    for name in (f"{gate}.mix", f"{gate}.domain_prompt", "image_adapters.0.norm.weight", f"{gate}.wg.weight",
                 "text_adapters.1.moe.deepspeed_moe.experts.deepspeed_experts.0.down.weight"):
        assert name in in_decay, name
    for name in ("image_adapters.0.norm.bias", "text_adapters.1.moe.deepspeed_moe.experts.deepspeed_experts.0.up.bias"):
        assert name in in_no_decay, name


def test_param_groups_by_dimension_when_asked(dm_model):
    from dsmoe.optim import param_groups

    cfg, model, _ = dm_model
    cfg.optim.no_decay = "1d"
    in_decay, in_no_decay = _groups_by_name(model, param_groups(model, cfg.optim))
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in in_decay) and all(params[n].ndim < 2 for n in in_no_decay)
    assert "image_adapters.0.moe.deepspeed_moe.gate.domain_prompt" in in_no_decay


def _tag(root, name, complete=True):
    (root / name).mkdir(parents=True)
    if complete:
        (root / name / "COMPLETE").write_text("{}")


def test_complete_tag_follows_only_complete_checkpoints(tmp_path):
    from dsmoe.checkpoint.folder import complete_tag

    assert complete_tag(tmp_path) is None
    _tag(tmp_path, "step00000010")
    _tag(tmp_path, "step00000020", complete=False)
    (tmp_path / "latest").write_text("step00000020\n")
    assert complete_tag(tmp_path) is None
    (tmp_path / "latest").write_text("step00000010\n")
    assert complete_tag(tmp_path) == "step00000010"
    assert complete_tag(tmp_path, "best") is None
    (tmp_path / "best").write_text("step00000010")
    assert complete_tag(tmp_path, "best") == "step00000010"


def test_resolve_checkpoint_accepts_run_checkpoints_and_tag_dirs(tmp_path):
    from dsmoe.checkpoint.folder import resolve_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(run)
    _tag(ckpts, "step00000010")
    _tag(ckpts, "step00000020")
    _tag(ckpts, "step00000030", complete=False)
    (ckpts / "latest").write_text("step00000020")
    assert resolve_checkpoint(run) == (ckpts, "step00000020")
    assert resolve_checkpoint(ckpts) == (ckpts, "step00000020")
    assert resolve_checkpoint(str(ckpts / "step00000010")) == (ckpts, "step00000010")
    # best wins over latest when it is complete; an incomplete best is ignored
    (ckpts / "best").write_text("step00000010")
    assert resolve_checkpoint(run) == (ckpts, "step00000010")
    (ckpts / "best").write_text("step00000030")
    assert resolve_checkpoint(run) == (ckpts, "step00000020")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(ckpts / "step00000030")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nowhere")
