"""DASD: dynamic adapters with semantics disentangling for cross-lingual cross-modal retrieval.

Target-language captions (mBERT tokens) -> trainable embedding table -> Linear to CLIP's text width -> CLIP's
frozen position embedding and text blocks (causal) with a dynamic adapter after every block -> final LayerNorm
-> state at [SEP] -> CLIP's text projection. The semantics extractors (the first frozen blocks, as the release runs
them: ``SemanticExtractors``) give the semantic-related f_sr ([SEP] readout + projection) and the semantic-agnostic
f_sa (mean over positions);
``z = QuickGELU(W [f_sr; f_sa])`` and each layer generates its own ``W_z = reshape(G_l z)``:
``A(x) = x + Up(ReLU(Down(x) @ W_z))``.

The dynamic adapters are experts of a DeepSpeed MoE layer after each block. Tokens enter the layer as
``[x ; z ; language]`` so the per-caption vector and the language reach the experts through DeepSpeed's dispatch:
with ``adapter.router: language`` every caption's tokens go to its language's expert (one expert = the released
DASD; one per language = all target languages trained jointly, sharded by expert parallelism), with ``linear`` a
learned top-k router over several dynamic experts decides.

The adversarial discriminator is not part of the DeepSpeed model: ``Discriminator`` has its own optimiser and
is stepped by ``DASDMethod`` (``method.py``) on detached inputs after each backward, its gradients averaged over all
ranks. ``EnglishCLIP`` is the optional first stage: all of CLIP fine-tuned on the English captions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn
from transformers import AutoModel

from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP, block_forward
from dsmoe.config import RunConfig
from dsmoe.losses import feature_distillation, semantic_consistency, symmetric_info_nce
from dsmoe.methods.dasd.config import DASDConfig
from dsmoe.moe.gates import LanguageRouter, LinearRouter
from dsmoe.moe.layer import build_moe, init_expert


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class DynamicAdapterExpert(nn.Module):
    """One dynamic adapter: tokens ``[x ; z ; lang]`` -> ``[Up(ReLU(Down(x) @ W_z)) ; 0]`` with W_z = G(z)."""

    def __init__(self, width: int, rank: int, z_dim: int):
        super().__init__()
        self.width, self.rank, self.z_dim = width, rank, z_dim
        self.down = nn.Linear(width, rank)
        self.generator = nn.Linear(z_dim, rank * rank)
        self.up = nn.Linear(rank, width)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for linear in (self.down, self.generator):
            nn.init.kaiming_uniform_(linear.weight, a=5 ** 0.5, generator=generator)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[..., :self.width]
        z = tokens[..., self.width:self.width + self.z_dim]
        w_z = self.generator(z).unflatten(-1, (self.rank, self.rank))
        hidden = torch.matmul(self.down(x).unsqueeze(-2), w_z).squeeze(-2)
        out = self.up(F.relu(hidden))
        return torch.cat([out, torch.zeros_like(tokens[..., self.width:])], dim=-1)  # DeepSpeed keeps the width


class DynamicAdapterLayer(nn.Module):
    """The dynamic adapter(s) after one text block: a DeepSpeed MoE layer (or one adapter for ``dense``)."""

    def __init__(self, cfg: RunConfig, width: int, index: int):
        super().__init__()
        d, a = DASDConfig.of(cfg), cfg.adapter
        self.width = width
        expert = DynamicAdapterExpert(width, d.adapter_rank, d.generator_dim)
        channels = width + d.generator_dim + 1
        branch = f"dasd.{index}"
        if a.router == "dense":
            self.moe = None
            self.adapter = expert
            init_expert(expert, cfg.train.seed, branch, 0)
        else:
            self.adapter = None

            def router() -> TopKGate:
                if a.router == "language":
                    return LanguageRouter(a.num_experts, a.capacity_factor)
                return LinearRouter(channels, a.num_experts, a.top_k, a.capacity_factor, route_dim=width)

            self.moe = build_moe(channels, expert, a, router, branch, cfg.train.seed)
        self.expert_counts: torch.Tensor | None = None
        self.lb_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, z: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([x, z.unsqueeze(1).expand(-1, x.shape[1], -1).to(x.dtype),
                            language.view(-1, 1, 1).expand(-1, x.shape[1], 1).to(x.dtype)], dim=-1)
        if self.moe is None:
            out = self.adapter(tokens)
        else:
            out, self.lb_loss, self.expert_counts = self.moe(tokens)
        return x + out[..., :self.width]


class SemanticExtractors(nn.Module):
    """f_sr and f_sa of the embedded target caption, from the first ``blocks`` frozen CLIP text blocks.

    As the release runs them (``mlps=False``): the blocks run once, their output is normalised by a LayerNorm
    without trained affine (the release's ``ln_mu`` / ``ln_sigma``, never trained, stay at weight 1, bias 0), and
    both features are read from it: f_sr = state at [SEP] through ``sr_projection``, f_sa = mean over all
    positions. ``mlps=True`` is the paper text's reading: each feature has its own pass with a residual bottleneck
    MLP after every block, and its own trainable LayerNorm.
    """

    def __init__(self, width: int, proj_dim: int, blocks: int, mlp_hidden: int | None):
        super().__init__()
        self.width, self.blocks = width, blocks
        self.sr_projection = nn.Linear(width, proj_dim, bias=False)
        self.paths = None
        if mlp_hidden:
            self.paths = nn.ModuleDict({name: nn.ModuleDict({
                "mlps": nn.ModuleList(nn.Sequential(nn.Linear(width, mlp_hidden), nn.ReLU(),
                                                    nn.Linear(mlp_hidden, width)) for _ in range(blocks)),
                "norm": nn.LayerNorm(width)}) for name in ("sr", "sa")})

    def _blocks(self, x: torch.Tensor, layers: nn.ModuleList, mlps: nn.ModuleList | None) -> torch.Tensor:
        for i in range(self.blocks):
            x = block_forward(layers[i], x, causal=True, index=i)
            if mlps is not None:
                x = x + mlps[i](x)
        return x

    def forward(self, h: torch.Tensor, layers: nn.ModuleList, sep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(h.shape[0], device=h.device)
        if self.paths is None:
            x = F.layer_norm(self._blocks(h, layers, None), (self.width,))
            return self.sr_projection(x[rows, sep]), x.mean(dim=1)
        sr = self.paths["sr"]["norm"](self._blocks(h, layers, self.paths["sr"]["mlps"]))
        sa = self.paths["sa"]["norm"](self._blocks(h, layers, self.paths["sa"]["mlps"]))
        return self.sr_projection(sr[rows, sep]), sa.mean(dim=1)


class Discriminator(nn.Module):
    """F: [f_sa ; g] -> two logits, class 1 for a mismatched pair (g of another caption), class 0 for the caption's
    own g (the release's "real" and "fake"); trained alternately with its own optimiser."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def mismatched(g: torch.Tensor) -> torch.Tensor:
    """Pair each caption with another sample's feature: the previous one in the batch, a derangement for any batch
    of two or more (the release flips the batch, which pairs the middle caption of an odd batch with its own)."""
    return torch.roll(g, shifts=1, dims=0)


class DASD(nn.Module):
    def __init__(self, cfg: RunConfig, backbone: FrozenCLIP, embeddings: torch.Tensor):
        super().__init__()
        d = DASDConfig.of(cfg)
        self.stage = d.stage
        self.consistency_weight = d.consistency_weight
        self.logit_scale = d.logit_scale
        self.backbone = backbone
        width = backbone.text_width
        proj_dim = backbone.clip.config.projection_dim
        self.embedding = nn.Embedding.from_pretrained(embeddings.clone().float(), freeze=False)
        self.embedding_proj = nn.Linear(embeddings.shape[1], width)
        self.extractors = SemanticExtractors(width, proj_dim, d.extractor_blocks,
                                             d.extractor_hidden if d.extractor_mlps else None)
        self.z_net = nn.Linear(proj_dim + width, d.generator_dim)
        self.adapters = nn.ModuleList(DynamicAdapterLayer(cfg, width, i) for i in range(backbone.num_text_blocks))
        self.disc_in_dim = width + proj_dim

    def embed_target(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.backbone.clip.text_model.embeddings.position_embedding.weight[: ids.shape[1]]
        return self.embedding_proj(self.embedding(ids)) + positions

    def encode_target(self, ids: torch.Tensor, sep: torch.Tensor, language: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target-language captions -> (feature, f_sr, f_sa)."""
        tm = self.backbone.clip.text_model
        layers = tm.encoder.layers
        h = self.embed_target(ids)
        f_sr, f_sa = self.extractors(h, layers, sep)
        z = quick_gelu(self.z_net(torch.cat([f_sr, f_sa], dim=-1)))
        x = h
        for i, layer in enumerate(layers):
            x = self.adapters[i](block_forward(layer, x, causal=True, index=i), z, language)
        x = tm.final_layer_norm(x)
        feature = self.backbone.clip.text_projection(x[torch.arange(x.shape[0], device=x.device), sep])
        return feature, f_sr, f_sa

    def encode_text(self, ids: torch.Tensor, sep: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        return self.encode_target(ids, sep, language)[0]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels)

    def expert_counts(self) -> dict[str, torch.Tensor]:
        return {f"text.{i}": a.expert_counts for i, a in enumerate(self.adapters)
                if a.expert_counts is not None}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            f_en = self.backbone.encode_text(batch["en_text"], batch["en_eot"]).float()
        feature, f_sr, f_sa = self.encode_target(batch["text"], batch["eot"], batch["language"])
        feature, f_sr = feature.float(), f_sr.float()
        distill = feature_distillation(feature, f_en)
        if self.stage == "cla":
            consistency = semantic_consistency(f_sr, f_en, "l1")
            loss = distill + self.consistency_weight * consistency
            anchor = f_en
            parts = {"mse": distill.detach(), "consistency": consistency.detach()}
        else:
            with torch.no_grad():
                image = self.backbone.encode_image(batch["image"]).float()
            nce = symmetric_info_nce(image, feature, logit_scale=self.logit_scale)
            consistency = semantic_consistency(f_sr, image, "smooth_l1")
            loss = nce + self.consistency_weight * consistency + distill
            anchor = image
            parts = {"nce": nce.detach(), "mse": distill.detach(), "consistency": consistency.detach()}
        return {"loss": loss, "f_sa": f_sa, "anchor": anchor, **parts}


def load_embedding_table(d: DASDConfig, vocab_size: int) -> torch.Tensor:
    """mBERT's word embeddings (or a random table of ``dasd.embedding_dim`` when ``dasd.embeddings`` is null)."""
    if d.embeddings is None:
        return torch.randn(vocab_size, d.embedding_dim, generator=torch.Generator().manual_seed(0)) * 0.02
    table = AutoModel.from_pretrained(d.embeddings).get_input_embeddings().weight.detach().float()
    if table.shape[0] < vocab_size:
        raise ValueError(f"{d.embeddings} has {table.shape[0]} word embeddings but the tokenizer "
                         f"{d.tokenizer} has {vocab_size} ids")
    return table


class EnglishCLIP(nn.Module):
    """DASD's optional first stage: all of CLIP fine-tuned with symmetric InfoNCE on (image, English caption)."""

    def __init__(self, backbone: TrainableCLIP, logit_scale: float):
        super().__init__()
        self.backbone, self.logit_scale = backbone, logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixels)

    def encode_text(self, ids: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(ids, eot)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = symmetric_info_nce(self.encode_image(batch["image"]).float(),
                                  self.encode_text(batch["text"], batch["eot"]).float(), self.logit_scale)
        return {"loss": loss}
