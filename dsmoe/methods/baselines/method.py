"""The baselines' models and methods: CLIP's two encoders trained through LoRA branches (``lora``) or whole
(``full``) with the SDM loss, on DM-Adapter's pairs and evaluation (``rank_metrics``)."""
from __future__ import annotations

import torch
from torch import nn

from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP, load_clip
from dsmoe.data.format import SOURCE_LANGUAGE
from dsmoe.data.pipeline import CaptionPairs
from dsmoe.losses import sdm_loss
from dsmoe.methods.baselines.config import FullConfig, LoRAConfig, SDMBaselineConfig
from dsmoe.methods.dm_adapter.method import DMAdapterMethod


class LoRACLIP(FrozenCLIP):
    """The frozen CLIP with LoRA branches (peft's ``inject_adapter_in_model``) on ``settings.target_modules`` of
    every block; only the branches train, and their dropout follows train / eval mode."""

    def __init__(self, clip, image_size: tuple[int, int], settings: LoRAConfig):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__(clip, image_size)
        inject_adapter_in_model(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                           target_modules=list(settings.target_modules), bias="none"), clip)

    def train(self, mode: bool = True):
        super().train(mode)  # the backbone stays in eval mode
        for module in self.clip.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout.train(mode)
        return self


class SDMRetrieval(nn.Module):
    """Image and caption features from ``backbone``'s encoders, trained with the SDM loss alone."""

    def __init__(self, backbone: FrozenCLIP, logit_scale: float):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels)

    def encode_text(self, ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(ids, eot)

    def expert_counts(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["text"], batch["eot"])
        sdm = sdm_loss(image, text, batch["pid"], logit_scale=self.logit_scale)
        return {"loss": sdm, "sdm": sdm.detach()}


class _SDMBaseline(DMAdapterMethod):
    """Person retrieval as DM-Adapter trains and scores it, with another trainable part."""

    settings: type[SDMBaselineConfig]

    def train_texts(self) -> CaptionPairs:
        return CaptionPairs(self.captions, SOURCE_LANGUAGE, self.settings.of(self.cfg).caption_corruption)

    def backbone(self) -> FrozenCLIP:
        raise NotImplementedError

    def build(self) -> SDMRetrieval:
        torch.manual_seed(self.cfg.train.seed)  # identical initialisation on every rank
        return SDMRetrieval(self.backbone(), self.settings.of(self.cfg).logit_scale)


class LoRAMethod(_SDMBaseline):
    settings = LoRAConfig

    def backbone(self) -> FrozenCLIP:
        return LoRACLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size, LoRAConfig.of(self.cfg))

    def describe(self) -> str:
        s = LoRAConfig.of(self.cfg)
        return f"LoRA rank {s.rank} (alpha {s.alpha:g}) on {', '.join(s.target_modules)} of both encoders"


class FullMethod(_SDMBaseline):
    settings = FullConfig

    def backbone(self) -> FrozenCLIP:
        return TrainableCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size)

    def describe(self) -> str:
        return "CLIP's encoders fine-tuned whole"
