"""The paper-scale configuration: ViT-B/16 CLIP at 384x128 with DM-Adapter's adapters (built from a config,
random weights: the real run loads openai/clip-vit-base-patch16 the same way)."""
from __future__ import annotations

from dsmoe.backbones.clip import FrozenCLIP
from dsmoe.backbones.clip import random_vit_b16_clip as vit_b16_clip
from dsmoe.config import load_config
from launch import REPO_ROOT
from dsmoe.optim import trainable_parameters
from dsmoe.methods.dm_adapter.method import DMAdapter


def test_vit_b16_dm_adapter_has_about_16m_trainable_parameters():
    cfg = load_config(REPO_ROOT / "dsmoe" / "configs" / "dm_adapter" / "cuhk_pedes.yaml")
    model = DMAdapter(cfg, FrozenCLIP(vit_b16_clip(), cfg.model.image_size))
    trainable = trainable_parameters(model)
    count = sum(p.numel() for p in trainable.values())
    # The paper reports about 16M trainable parameters.
    assert 15_000_000 < count < 17_000_000, count
    assert all(name.startswith(("image_adapters.", "text_adapters.")) for name in trainable)
    # every block of both encoders carries the adapters; the backbone sees a 24x8 grid
    assert len(model.image_adapters) == 12 and len(model.text_adapters) == 12
    assert model.backbone.grid == (24, 8) and model.backbone.image_positions.shape == (1 + 24 * 8, 768)
    print(f"ViT-B/16 DM-Adapter trainable parameters: {count:,}")


MBERT_VOCAB = 119547  # bert-base-multilingual-cased


def test_vit_b16_dasd_trainable_parameters(dist_env):
    """Released DASD (one target language, one dynamic adapter per text block) on ViT-B/16; the table is mBERT's
    size (random here: the real run loads bert-base-multilingual-cased's word embeddings)."""
    import torch

    from dsmoe.methods.dasd.model import DASD

    cfg = load_config(REPO_ROOT / "dsmoe" / "configs" / "dasd" / "multi30k_finetune.yaml",
                      ["dasd.languages=[de]", "adapter.num_experts=1"])
    model = DASD(cfg, FrozenCLIP(vit_b16_clip(), cfg.model.image_size), torch.zeros(MBERT_VOCAB, 768))
    trainable = trainable_parameters(model)
    table = trainable["embedding.weight"].numel()
    total = sum(p.numel() for p in trainable.values())
    assert table == MBERT_VOCAB * 768
    per_block = 512 * 32 + 32 + 512 * 32 * 32 + 32 * 32 + 32 * 512 + 512  # down, generator, up
    assert sum(p.numel() for n, p in trainable.items() if n.startswith("adapters.")) == 12 * per_block
    print(f"ViT-B/16 DASD trainable parameters: {total - table:,} without the embedding table, {total:,} with it")
    # the release's trained names: the 768->512 projection, sr_projection, the z generator and the adapters
    # (the extractors themselves are the frozen CLIP blocks; ln_mu / ln_sigma are never trained)
    assert total - table == (768 * 512 + 512) + 512 * 512 + (1024 * 512 + 512) + 12 * per_block == 7_884_160
