"""DASD: dynamic adapters as DeepSpeed MoE experts, language routing, disentangling, losses, the discriminator."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsmoe.config import DEFAULT_DEMO_CONFIG, ConfigError, load_config
from dsmoe.data.pipeline import TranslationPairs

TARGET_CAPTIONS = ["oder aa ni ot ka", "ka lu mi zo te ra", "ni po sa qe vu di zo", "te ra ka oder aa"]


@pytest.fixture(scope="session")
def tiny_mbert_dir(tmp_path_factory) -> Path:
    from dsmoe.demo.models import build_tiny_mbert

    out = tmp_path_factory.mktemp("tiny-mbert")
    build_tiny_mbert(out, TARGET_CAPTIONS * 5)
    return out


def dasd_config(clip_dir: Path, mbert_dir: Path, *extra: str):
    return load_config(DEFAULT_DEMO_CONFIG.parent.parent / "dasd" / "demo.yaml", [
        "demo=false", "data.shards=/unused", f"model.clip={clip_dir}", "model.image_size=[16, 16]",
        "model.text_length=12", "adapter.router=language", "adapter.num_experts=2", "adapter.top_k=1",
        "adapter.ep_size=1", "dasd.languages=[xx, yy]", f"dasd.tokenizer={mbert_dir}", f"dasd.embeddings={mbert_dir}",
        "dasd.adapter_rank=4", "dasd.generator_dim=8", *extra])


@pytest.fixture
def method(tiny_clip_dir, tiny_mbert_dir, wire):
    from dsmoe.methods.dasd.method import DASDMethod

    m = DASDMethod(dasd_config(tiny_clip_dir, tiny_mbert_dir))
    m.model = wire(m.build())
    return m


def _batch(method, n: int = 4, image: bool = False) -> dict:
    en = method.english.encode(["a woman in a red top", "the man wears a green shirt", "a person in an orange jacket",
                                "someone wearing blue jeans"][:n])
    tgt = method.target.encode(TARGET_CAPTIONS[:n])
    batch = {"en_text": en.ids, "en_eot": en.eot, "text": tgt.ids, "eot": tgt.eot,
             "language": torch.tensor([0, 1, 0, 1][:n])}
    if image:
        batch["image"] = torch.randn(n, 3, 16, 16)
    return batch


def _randomise_up(model) -> None:
    """Give every dynamic adapter a non-zero up-projection (they start as the identity)."""
    g = torch.Generator().manual_seed(3)
    for layer in model.adapters:
        experts = layer.moe.deepspeed_moe.experts.deepspeed_experts if layer.moe else [layer.adapter]
        for e in experts:
            with torch.no_grad():
                e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=g) * 0.5)


def test_dynamic_adapter_expert_applies_the_generated_matrix():
    from dsmoe.methods.dasd.model import DynamicAdapterExpert

    expert = DynamicAdapterExpert(width=6, rank=3, z_dim=5)
    expert.reset_parameters(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(expert.up.weight)
    tokens = torch.randn(2, 7, 6 + 5 + 1)
    out = expert(tokens)
    assert out.shape == tokens.shape and torch.all(out[..., 6:] == 0)
    x, z = tokens[0, 0, :6], tokens[0, 0, 6:11]
    w_z = expert.generator(z).view(3, 3)
    manual = expert.up(F.relu(expert.down(x) @ w_z))
    assert torch.allclose(out[0, 0, :6], manual, atol=1e-6)
    other = tokens.clone()
    other[..., 6:11] = torch.randn(2, 7, 5)  # same x, another caption vector -> another adapter
    assert not torch.allclose(expert(other)[..., :6], out[..., :6])


def test_language_routing_sends_every_token_to_its_language_expert(method):
    model = method.model
    _randomise_up(model)
    layer = model.adapters[0]
    x = torch.randn(4, 5, model.backbone.text_width)
    z = torch.randn(4, method.settings.generator_dim)
    language = torch.tensor([1, 0, 1, 1])
    out = layer(x, z, language)
    assert layer.expert_counts.tolist() == [1 * 5, 3 * 5]  # all tokens, none dropped
    experts = layer.moe.deepspeed_moe.experts.deepspeed_experts
    for b in range(4):
        tokens = torch.cat([x[b], z[b].expand(5, -1), torch.full((5, 1), float(language[b]))], dim=-1)
        expected = x[b] + experts[int(language[b])](tokens)[:, :x.shape[-1]]
        assert torch.allclose(out[b], expected, atol=1e-5), b
    # the language router learns nothing: its DeepSpeed weight is frozen, not a dead trainable parameter
    assert not layer.moe.deepspeed_moe.gate.wg.weight.requires_grad


def test_adapters_start_as_identity_and_disentangling_readouts(method):
    from dsmoe.backbones.clip import block_forward

    model = method.model
    b = _batch(method)
    feature, f_sr, f_sa = model.encode_target(b["text"], b["eot"], b["language"])
    width, proj = model.backbone.text_width, model.backbone.clip.config.projection_dim
    assert f_sr.shape == (4, proj) and f_sa.shape == (4, width) and feature.shape == (4, proj)
    tm = model.backbone.clip.text_model
    x = model.embed_target(b["text"])
    for i, layer in enumerate(tm.encoder.layers):
        x = block_forward(layer, x, causal=True, index=i)
    plain = model.backbone.clip.text_projection(tm.final_layer_norm(x)[torch.arange(4), b["eot"]])
    assert torch.allclose(feature, plain, atol=1e-5)
    # f_sr reads the [SEP] state (causal: tokens after it do not matter); f_sa averages every position
    changed = b["text"].clone()
    changed[0, b["eot"][0] + 1:] = 7
    _, sr2, sa2 = model.encode_target(changed, b["eot"], b["language"])
    assert torch.allclose(sr2[0], f_sr[0], atol=1e-5) and not torch.allclose(sa2[0], f_sa[0])


def test_cla_and_cma_losses_follow_the_formulas(tiny_clip_dir, tiny_mbert_dir, wire):
    """The release's stage losses: CLA = MSE(f_tgt, f_en) + 0.1 L1(f_sr, f_en); CMA = InfoNCE(image, f_tgt) +
    0.1 SmoothL1(image, f_sr) + MSE(f_tgt, f_en), each distance written out here."""
    from dsmoe.methods.dasd.method import DASDMethod

    def smooth_l1(a, b):
        d = (a - b).abs()
        return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()

    def info_nce(a, b, scale):
        logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
        target = torch.arange(len(a))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    for stage in ("cla", "cma"):
        m = DASDMethod(dasd_config(tiny_clip_dir, tiny_mbert_dir, f"dasd.stage={stage}"))
        model = wire(m.build())
        _randomise_up(model)
        b = _batch(m, image=stage == "cma")
        out = model(b)
        f_en = model.backbone.encode_text(b["en_text"], b["en_eot"])
        feature, f_sr, _ = model.encode_target(b["text"], b["eot"], b["language"])
        mse = ((feature - f_en) ** 2).mean()
        if stage == "cla":
            expected = mse + 0.1 * (f_sr - f_en).abs().mean()
        else:
            image = model.backbone.encode_image(b["image"])
            expected = info_nce(image, feature, 100.0) + 0.1 * smooth_l1(image, f_sr) + mse
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5), stage
        assert out["consistency"].item() != pytest.approx(smooth_l1(f_sr, f_en).item() if stage == "cla" else
                                                          (image - f_sr).abs().mean().item(), rel=1e-3)


def _release_extractors(model, ids: torch.Tensor, sep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f_sr and f_sa as the release's ``encode_text(zi_bool=True)`` computes them, written out with transformers'
    own CLIP layers: the embedded caption (plus CLIP's positions) through the first two frozen text blocks, a
    LayerNorm of weight 1 and bias 0, then the [SEP] state through ``sr_projection`` and the mean over positions."""
    x = model.embedding.weight[ids] @ model.embedding_proj.weight.t() + model.embedding_proj.bias
    x = x + model.backbone.clip.text_model.embeddings.position_embedding.weight[: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for layer in model.backbone.clip.text_model.encoder.layers[:2]:
        x = layer(x, attention_mask=causal)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    f_sr = normed[torch.arange(len(ids)), sep] @ model.extractors.sr_projection.weight.t()
    return f_sr, normed.mean(dim=1)


def test_semantics_extractors_are_the_releases(tiny_clip_dir, tiny_mbert_dir, wire):
    from dsmoe.methods.dasd.method import DASDMethod

    method = DASDMethod(dasd_config(tiny_clip_dir, tiny_mbert_dir))
    model = wire(method.build())
    b = _batch(method)
    _, f_sr, f_sa = model.encode_target(b["text"], b["eot"], b["language"])
    ref_sr, ref_sa = _release_extractors(model, b["text"], b["eot"])
    torch.testing.assert_close(f_sr, ref_sr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_sa, ref_sa, atol=1e-5, rtol=1e-5)
    # nothing of the extractors is trained but the [SEP] projection (no MLPs, no LayerNorm affine)
    trained = {n for n, p in model.extractors.named_parameters() if p.requires_grad}
    assert trained == {"sr_projection.weight"}
    # the paper text's reading stays available: its own MLPs and LayerNorms, and other features
    paper = DASDMethod(dasd_config(tiny_clip_dir, tiny_mbert_dir, "dasd.extractor_mlps=true",
                                   "dasd.extractor_hidden=8"))
    paper_model = wire(paper.build())
    paper_trained = {n for n, p in paper_model.extractors.named_parameters() if p.requires_grad}
    assert {"paths.sr.mlps.0.0.weight", "paths.sa.norm.weight"} <= paper_trained
    _, p_sr, _ = paper_model.encode_target(b["text"], b["eot"], b["language"])
    assert not torch.allclose(p_sr, _release_extractors(paper_model, b["text"], b["eot"])[0], atol=1e-3)


class _FakeEngine:
    def __init__(self):
        self.losses = []

    def backward(self, loss):
        self.losses.append(loss.detach())
        loss.backward()


def _one_hot_bce(logits: torch.Tensor, cls: int) -> torch.Tensor:
    target = torch.zeros_like(logits)
    target[:, cls] = 1
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()


def test_discriminator_steps_first_and_the_model_is_scored_by_the_updated_one(method):
    """As the release (adv.py, GAN mode): F steps on detached pairs with 0.5 (BCE(mismatched, 1) + BCE(own, 0)),
    then the model's term is scale x BCE(mismatched, 0) under the updated F. Mismatched pairs: the previous
    caption's anchor (roll, a derangement for any batch; the release flips the batch)."""
    import copy

    model = method.model
    reference = copy.deepcopy(method.discriminator)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-4)
    out = model(_batch(method))
    f_sa, anchor = out["f_sa"].detach().float(), out["anchor"].detach().float()
    own, other = torch.cat([f_sa, anchor], -1), torch.cat([f_sa, torch.roll(anchor, 1, 0)], -1)
    ref_loss = 0.5 * (_one_hot_bce(reference(other), 1) + _one_hot_bce(reference(own), 0))
    ref_loss.backward()
    ref_optimizer.step()
    fool_after_step = _one_hot_bce(reference(other), 0)

    engine = _FakeEngine()
    method.backward(engine, out)
    assert out["discriminator"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for mine, ref in zip(method.discriminator.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, ref)
    assert out["adversarial"].item() == pytest.approx(fool_after_step.item(), rel=1e-6)
    assert engine.losses[0].item() == pytest.approx((out["loss"] + 0.001 * fool_after_step).item(), rel=1e-6)


def test_discriminator_step_changes_only_its_own_parameters(method):
    model = method.model
    disc_before = [p.detach().clone() for p in method.discriminator.parameters()]
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(_batch(method))
    method.backward(_FakeEngine(), out)
    assert any(not torch.equal(a, p) for a, p in zip(disc_before, method.discriminator.parameters()))
    assert all(torch.equal(model_before[n], p) for n, p in model.named_parameters())  # the engine steps those
    assert {id(p) for g in method.disc_optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in method.discriminator.parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("discriminator" in n for n in names)  # F is not in the DeepSpeed model or its optimiser
    assert out["f_sa"].requires_grad and out["discriminator"].item() > 0 and "adversarial" in out


def test_a_stage_started_from_another_takes_over_its_trained_discriminator(method, tiny_clip_dir, tiny_mbert_dir,
                                                                          wire):
    """As the release's CMA, which loads its CLA checkpoint with the discriminator's weights; its optimiser starts
    fresh. ``dasd.fresh_discriminator`` starts a new one."""
    from dsmoe.methods.dasd.method import DASDMethod

    method.backward(_FakeEngine(), method.model(_batch(method)))  # a CLA step trains the discriminator
    saved = method.state_dict()
    for fresh in (False, True):
        cma = DASDMethod(dasd_config(tiny_clip_dir, tiny_mbert_dir, "dasd.stage=cma",
                                     f"dasd.fresh_discriminator={str(fresh).lower()}"))
        cma.model = wire(cma.build())
        before = {k: v.clone() for k, v in cma.discriminator.state_dict().items()}
        said = cma.load_initial_state(saved)
        now = cma.discriminator.state_dict()
        expected = before if fresh else saved["discriminator"]
        assert all(torch.equal(now[k], expected[k]) for k in now) and said == (None if fresh else "its discriminator")
        assert not any(torch.equal(now[k], saved["discriminator"][k]) for k in now) or not fresh
        assert cma.disc_optimizer.state_dict()["state"] == {}  # the optimiser starts fresh


def test_trainable_parameters_are_the_target_text_path(method):
    names = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in names} == {"embedding", "embedding_proj", "extractors", "z_net", "adapters"}
    assert "embedding.weight" in names and any("deepspeed_experts" in n for n in names)
    # the table starts from the "mBERT" word embeddings
    from transformers import AutoModel

    table = AutoModel.from_pretrained(method.settings.embeddings).get_input_embeddings().weight
    assert torch.equal(method.model.embedding.weight.detach(), table.detach())


def test_translation_pairs_align_captions_by_index(method):
    pairs = TranslationPairs(method.english, method.target, ["xx", "yy"])
    meta = {"captions": {"en": ["a", "b"], "xx": ["A", "B", "C"], "yy": ["Y"]}}
    expanded = pairs.expand(meta)
    assert [payload for _, payload in expanded] == [("a", "A", 0), ("b", "B", 0), ("a", "Y", 1)]
    batch = pairs.collate([("k", c, p) for c, p in expanded], lambda *_: None)
    assert batch["language"].tolist() == [0, 0, 1] and batch["text"].shape[0] == 3


def test_dasd_config_checks_and_stages(tiny_clip_dir, tiny_mbert_dir):
    with pytest.raises(ConfigError, match="num_experts"):
        dasd_config(tiny_clip_dir, tiny_mbert_dir, "adapter.num_experts=3")
    with pytest.raises(ConfigError, match="domain_aware"):
        dasd_config(tiny_clip_dir, tiny_mbert_dir, "adapter.router=domain_aware", "adapter.top_k=2")
    cfg = dasd_config(tiny_clip_dir, tiny_mbert_dir, "train.output_dir=/runs/x", "dasd.cla={epochs: 3, lr: 0.1}")
    cla, cma = cfg.stage_runs()
    assert (cla.method_config.stage, cla.train.output_dir, cla.train.epochs, cla.optim.lr) == \
        ("cla", "/runs/x/cla", 3, 0.1)
    assert (cma.method_config.stage, cma.train.output_dir, cma.train.init_from) == ("cma", "/runs/x/cma", "/runs/x/cla")
