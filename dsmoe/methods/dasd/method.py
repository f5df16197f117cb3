"""DASD's training and evaluation: caption pairs per stage, the discriminator's alternating step, recall per
language; and the optional English fine-tune stage."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP, load_clip
from dsmoe.config import RunConfig
from dsmoe.data.pipeline import CaptionPairs, TranslationPairs
from dsmoe.data.text import CaptionEncoder, load_tokenizer
from dsmoe.losses import discriminator_loss, fool_discriminator
from dsmoe.methods.base import Method, caption_query_encoder
from dsmoe.methods.dasd.config import DASDConfig
from dsmoe.methods.dasd.model import DASD, Discriminator, EnglishCLIP, load_embedding_table, mismatched
from dsmoe.metrics import recall_metrics_from_features
from dsmoe.data.format import SOURCE_LANGUAGE


def build_method(cfg: RunConfig) -> Method:
    """The method of the stage ``cfg`` runs."""
    return EnglishFinetuneMethod(cfg) if DASDConfig.of(cfg).stage == "english" else DASDMethod(cfg)


class DASDMethod(Method):
    """Cross-lingual retrieval: (English, target) caption pairs (+ images in CMA), evaluation by recall per language."""

    selection_metric = "mAR"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        d = self.settings = DASDConfig.of(cfg)
        self.languages = list(d.languages)
        self.load_images = d.stage == "cma"
        self.report_metrics = ("mAR", *(f"AR_{lang}" for lang in self.languages))
        self.english = CaptionEncoder(load_tokenizer(cfg.model.tokenizer_source()), cfg.model.text_length,
                                       cfg.model.pad_id)
        self.target = CaptionEncoder(load_tokenizer(d.tokenizer), cfg.model.text_length)
        self.discriminator: Discriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None

    def build(self) -> DASD:
        torch.manual_seed(self.cfg.train.seed)  # identical non-expert (and discriminator) weights on every rank
        backbone = FrozenCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size)
        model = DASD(self.cfg, backbone, load_embedding_table(self.settings, len(self.target.tokenizer)))
        self.discriminator = Discriminator(model.disc_in_dim)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.settings.discriminator_lr)
        return model

    def train_texts(self) -> TranslationPairs:
        return TranslationPairs(self.english, self.target, self.languages)

    def train_languages(self) -> tuple[str, ...]:
        return tuple(self.languages)

    def backward(self, engine, out: dict) -> None:
        """As the release: the discriminator steps first on detached pairs, then the model's loss takes the
        adversarial term of the updated discriminator."""
        disc = self.discriminator.to(out["f_sa"].device)
        f_sa, anchor = out["f_sa"].float(), out["anchor"].float()
        own = torch.cat([f_sa, anchor], dim=-1)
        other = torch.cat([f_sa, mismatched(anchor)], dim=-1)

        self.disc_optimizer.zero_grad(set_to_none=True)  # drop what the last main backward left in F
        disc_loss = discriminator_loss(disc(other.detach()), disc(own.detach()))
        disc_loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:  # identical F on every rank
            for p in disc.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(dist.get_world_size())
        self.disc_optimizer.step()
        out["discriminator"] = disc_loss.detach()

        fool = fool_discriminator(disc(other))  # f_sa must not tell which g is its caption's
        out["adversarial"] = fool.detach()
        engine.backward(out["loss"] + self.settings.adversarial_weight * fool)

    def query_encoder(self, model: DASD, language: str):
        index = self.languages.index(language)

        def encode(captions: list[str]) -> dict:
            encoded = self.target.encode(captions)
            return {"text": encoded.ids, "eot": encoded.eot, "language": torch.full((len(captions),), index)}

        return encode, lambda b: model.encode_text(b["text"], b["eot"], b["language"])

    def evaluate(self, evaluator, split: str) -> dict:
        result: dict = {}
        for lang in self.languages:
            report = recall_report(evaluator, split, lang, *self.query_encoder(evaluator.model, lang))
            result[f"AR_{lang}"] = report["AR"]
            result[lang] = report
        result["mAR"] = sum(result[f"AR_{lang}"] for lang in self.languages) / len(self.languages)
        return result

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["optimizer"])

    def load_initial_state(self, state: dict) -> str | None:
        """The previous stage's trained discriminator (not its optimiser), unless ``dasd.fresh_discriminator``."""
        if "discriminator" not in state or self.settings.fresh_discriminator:
            return None
        self.discriminator.load_state_dict(state["discriminator"])
        return "its discriminator"


def recall_report(evaluator, split: str, language: str, encode, text_forward) -> dict:
    """recall_metrics of one language's captions against the split's images (features from ``evaluator``)."""
    f = evaluator.features(split, language, encode, text_forward)
    metrics = recall_metrics_from_features(f.texts, f.text_labels, f.images, f.image_labels, **evaluator.sharing)
    return {**metrics, "images": int(f.images.shape[0]), "captions": int(f.texts.shape[0])}


class EnglishFinetuneMethod(Method):
    selection_metric = "AR_en"
    report_metrics = ("AR_en",)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.english = CaptionEncoder(load_tokenizer(cfg.model.tokenizer_source()), cfg.model.text_length,
                                       cfg.model.pad_id)

    def build(self) -> EnglishCLIP:
        torch.manual_seed(self.cfg.train.seed)
        backbone = TrainableCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size)
        return EnglishCLIP(backbone, DASDConfig.of(self.cfg).logit_scale)

    def train_texts(self) -> CaptionPairs:
        return CaptionPairs(self.english, SOURCE_LANGUAGE)

    def query_encoder(self, model: EnglishCLIP, language: str):
        return caption_query_encoder(self.english, model.encode_text)

    def evaluate(self, evaluator, split: str) -> dict:
        report = recall_report(evaluator, split, SOURCE_LANGUAGE,
                               *self.query_encoder(evaluator.model, SOURCE_LANGUAGE))
        return {"AR_en": report["AR"], "en": report}

    def on_finish(self, model: EnglishCLIP, run_dir, rank: int) -> None:
        """Save the fine-tuned CLIP (and its tokenizer) where the next stages load it from."""
        if rank == 0:
            out = run_dir / "clip"
            model.backbone.clip.save_pretrained(out)
            self.english.tokenizer.save_pretrained(out)
        if dist.is_initialized():
            dist.barrier()
