"""What the training loop needs from a method (``Method``) and from the model it builds (``RetrievalModel``), and
what a method sees of the evaluator (``SplitEvaluator``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from dsmoe.config import RunConfig
from dsmoe.data.format import SOURCE_LANGUAGE
from dsmoe.data.text import CaptionEncoder


@dataclass
class SplitFeatures:
    """A split's images and one language's captions as the metrics take them: L2-normalised features in the model's
    dtype on the evaluation device, in split order (captions in their sample's order), the same on every rank."""

    images: torch.Tensor  # [N, D]
    image_labels: torch.Tensor  # [N] person id, or image id for image-text data
    texts: torch.Tensor  # [M, D]
    text_labels: torch.Tensor  # [M] the label of the caption's image


class SplitEvaluator(Protocol):
    """What a method's ``evaluate`` uses of the evaluator (``dsmoe.evaluator.Evaluator``)."""

    model: nn.Module  # the method's model (unwrapped)

    @property
    def sharing(self) -> dict:
        """Keyword arguments of ``dsmoe.metrics``' ``*_from_features`` that share the blocks between ranks."""

    def features(self, split: str, language: str, encode: Callable[[list[str]], dict],
                 text_forward: Callable[[dict], torch.Tensor]) -> SplitFeatures:
        """The split's image features and its ``language`` captions' features, on every rank."""


class RetrievalModel(Protocol):
    """The model a method builds, as the loop and the evaluator use it (an ``nn.Module`` wrapped by DeepSpeed)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch -> ``{"loss": scalar, ...}``: the loss to minimise and other parts to log (0-d tensors
        are logged; anything else, e.g. features the method's ``backward`` needs, is passed through)."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (or videos [B, N, 3, H, W]) normalised pixels -> [B, D] image features."""

    def expert_counts(self) -> dict[str, torch.Tensor]:
        """Tokens routed to each expert in the last forward, per MoE layer, on the device (empty without
        experts)."""


class Method:
    """A retrieval method: its model, its training pairs, its backward step, its evaluation.

    ``selection_metric`` names the key of ``evaluate``'s result used for model selection.
    """

    selection_metric: str = "score"
    report_metrics: tuple[str, ...] = ()
    """Keys of ``evaluate``'s result printed in the final table."""
    load_images: bool = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def build(self) -> RetrievalModel:
        raise NotImplementedError

    def describe(self) -> str:
        """What the run trains, for its closing summary (``results.json``: ``trained``)."""
        a = self.cfg.adapter
        if a.router == "dense":
            return "one adapter a layer (no experts)"
        return f"{a.num_experts} experts a layer (top-{a.top_k}, {a.router} router)"

    def train_texts(self):
        """``CaptionPairs`` / ``TranslationPairs``: the pairs a sample gives and how a batch of them is encoded."""
        raise NotImplementedError

    def train_languages(self) -> tuple[str, ...]:
        return (SOURCE_LANGUAGE,)

    def backward(self, engine, out: dict) -> None:
        engine.backward(out["loss"])

    def query_encoder(self, model: RetrievalModel, language: str) -> tuple[Callable[[list[str]], dict],
                                                                           Callable[[dict], torch.Tensor]]:
        """How captions in ``language`` (one of ``train_languages``) become text features: (captions -> a batch
        of tensors, that batch on the model's device -> [B, D] features)."""
        raise NotImplementedError

    def evaluate(self, evaluator: SplitEvaluator, split: str) -> dict:
        raise NotImplementedError

    def on_finish(self, model: nn.Module, run_dir, rank: int) -> None:
        """Called on every rank after the final test (the selected weights are loaded)."""

    def state_dict(self) -> dict:
        """Method state kept outside the DeepSpeed engine (saved in the checkpoint's client state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def load_initial_state(self, state: dict) -> str | None:
        """What a run started from another run's weights (``train.init_from``) takes over of that run's method state
        (``state_dict`` as saved there): nothing by default; else what it took, for the log."""
        return None

    @staticmethod
    def scalars(out: dict) -> dict[str, float]:
        """Loss parts to log: the 0-d tensors of the forward's output."""
        return {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}


def caption_query_encoder(encoder: CaptionEncoder, encode_text: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                          ) -> tuple[Callable[[list[str]], dict], Callable[[dict], torch.Tensor]]:
    """A ``Method.query_encoder`` for captions tokenised by ``encoder`` and encoded by ``encode_text(ids, eot)``."""
    def encode(captions: list[str]) -> dict:
        encoded = encoder.encode(captions)
        return {"text": encoded.ids, "eot": encoded.eot}

    return encode, lambda batch: encode_text(batch["text"], batch["eot"])
