"""DM-Adapter: a sparse mixture of adapters with a domain-aware router in every block of both CLIP encoders.

Block: ``x = x + attn(ln_1 x);  x = x + mlp(ln_2 x) + s * SMA(ln_3 x)`` with s = 0.1 (image), 4 (text).
Loss: SDM + lb_weight * sum over layers of the load-balancing loss.
"""
from __future__ import annotations

import torch
from torch import nn

from dsmoe.backbones.clip import FrozenCLIP, load_clip
from dsmoe.config import RunConfig
from dsmoe.data.pipeline import CaptionPairs
from dsmoe.data.text import CaptionEncoder, load_tokenizer
from dsmoe.losses import sdm_loss
from dsmoe.methods.base import Method, caption_query_encoder
from dsmoe.methods.dm_adapter.config import DMAdapterConfig
from dsmoe.metrics import rank_metrics_from_features
from dsmoe.moe.adapter import AdapterBranch
from dsmoe.data.format import SOURCE_LANGUAGE


class DMAdapter(nn.Module):
    def __init__(self, cfg: RunConfig, backbone: FrozenCLIP):
        super().__init__()
        self.backbone = backbone
        settings = DMAdapterConfig.of(cfg)
        self.image_scale = settings.image_scale
        self.text_scale = settings.text_scale
        self.logit_scale = settings.logit_scale
        self.lb_weight = settings.lb_weight
        seed = cfg.train.seed
        self.image_adapters = nn.ModuleList(
            AdapterBranch(backbone.image_width, cfg.adapter, f"image.{i}", seed)
            for i in range(backbone.num_image_blocks))
        self.text_adapters = nn.ModuleList(
            AdapterBranch(backbone.text_width, cfg.adapter, f"text.{i}", seed)
            for i in range(backbone.num_text_blocks))

    def _image_branch(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.image_scale * self.image_adapters[index](x)

    def _text_branch(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.text_scale * self.text_adapters[index](x)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels, parallel=self._image_branch)

    def encode_text(self, ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(ids, eot, parallel=self._text_branch)

    def branches(self) -> dict[str, AdapterBranch]:
        named = {f"image.{i}": b for i, b in enumerate(self.image_adapters)}
        named.update({f"text.{i}": b for i, b in enumerate(self.text_adapters)})
        return named

    def routing_loss(self) -> torch.Tensor:
        """Load-balancing loss of the last forward, summed over every adapted layer."""
        return torch.stack([b.lb_loss.float() for b in self.branches().values()]).sum()

    def expert_counts(self) -> dict[str, torch.Tensor]:
        """Routes per expert of the last forward, per layer (this rank's tokens)."""
        return {name: b.expert_counts for name, b in self.branches().items()
                if b.expert_counts is not None}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image = self.encode_image(batch["image"])
        image_lb = torch.stack([b.lb_loss.float() for b in self.image_adapters]).sum()
        text = self.encode_text(batch["text"], batch["eot"])
        text_lb = torch.stack([b.lb_loss.float() for b in self.text_adapters]).sum()
        sdm = sdm_loss(image, text, batch["pid"], logit_scale=self.logit_scale)
        lb = image_lb + text_lb
        return {"loss": sdm + self.lb_weight * lb, "sdm": sdm.detach(), "lb": lb.detach()}


class DMAdapterMethod(Method):
    """Person retrieval: pairs (image, caption, person id), SDM + LB, evaluation by ``rank_metrics``."""

    selection_metric = "R1"
    report_metrics = ("R1", "R5", "R10", "mAP", "mINP")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.captions = CaptionEncoder(load_tokenizer(cfg.model.tokenizer_source()), cfg.model.text_length,
                                       cfg.model.pad_id)

    def build(self) -> DMAdapter:
        torch.manual_seed(self.cfg.train.seed)  # identical non-expert initialisation on every rank
        return DMAdapter(self.cfg, FrozenCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size))

    def train_texts(self) -> CaptionPairs:
        return CaptionPairs(self.captions, SOURCE_LANGUAGE, DMAdapterConfig.of(self.cfg).caption_corruption)

    def query_encoder(self, model: DMAdapter, language: str):
        return caption_query_encoder(self.captions, model.encode_text)

    def evaluate(self, evaluator, split: str) -> dict:
        f = evaluator.features(split, SOURCE_LANGUAGE, *self.query_encoder(evaluator.model, SOURCE_LANGUAGE))
        metrics = rank_metrics_from_features(f.texts, f.text_labels, f.images, f.image_labels, **evaluator.sharing)
        return {**metrics, "images": int(f.images.shape[0]), "captions": int(f.texts.shape[0])}
