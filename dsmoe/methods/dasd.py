"""DASD: dynamic adapters with semantics disentangling for cross-lingual cross-modal retrieval.

Target-language captions (mBERT tokens) -> trainable embedding table -> Linear to CLIP's text width -> CLIP's
frozen position embedding and text blocks (causal) with a dynamic adapter after every block -> final LayerNorm
-> state at [SEP] -> CLIP's text projection. Two extractors (the first frozen blocks, each followed by a
bottleneck MLP) give the semantic-related f_sr ([SEP] readout + projection) and semantic-agnostic f_sa (mean);
``z = QuickGELU(W [f_sr; f_sa])`` and each layer generates its own ``W_z = reshape(G_l z)``:
``A(x) = x + Up(ReLU(Down(x) @ W_z))``.

The dynamic adapters are experts of a DeepSpeed MoE layer after each block. Tokens enter the layer as
``[x ; z ; language]`` so the per-caption vector and the language reach the experts through DeepSpeed's dispatch:
with ``adapter.router: language`` every caption's tokens go to its language's expert (one expert = the released
DASD; one per language = all target languages trained jointly, sharded by expert parallelism), with ``linear`` a
learned top-k router over several dynamic experts decides.

The adversarial discriminator is not part of the DeepSpeed model: ``Discriminator`` has its own optimiser and
is stepped by ``DASDMethod`` on detached inputs after each backward, its gradients averaged over all ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

import torch.distributed as dist
from transformers import AutoModel

from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP, block_forward, load_clip
from dsmoe.config import RunConfig
from dsmoe.data.pipeline import CaptionPairs, TranslationPairs
from dsmoe.data.text import CaptionEncoder, load_tokenizer
from dsmoe.shards.format import SOURCE_LANGUAGE
from dsmoe.losses import symmetric_info_nce
from dsmoe.methods.base import Method
from dsmoe.metrics import recall_metrics
from dsmoe.moe.adapter import expert_parallel_rank, expert_seed
from dsmoe.moe.gates import LanguageRouter, LinearRouter


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
        d, a = cfg.dasd, cfg.adapter
        self.width = width
        expert = DynamicAdapterExpert(width, d.adapter_rank, d.generator_dim)
        channels = width + d.generator_dim + 1
        branch = f"dasd.{index}"
        if a.router == "dense":
            self.moe = None
            self.adapter = expert
            expert.reset_parameters(torch.Generator().manual_seed(expert_seed(cfg.train.seed, branch, 0)))
        else:
            self.adapter = None
            self.moe = MoE(channels, expert, num_experts=a.num_experts, ep_size=a.ep_size, k=a.top_k,
                           drop_tokens=a.capacity_factor is not None, use_rts=False, top2_2nd_expert_sampling=False)
            router = LanguageRouter(a.num_experts, a.capacity_factor) if a.router == "language" else \
                LinearRouter(channels, a.num_experts, a.top_k, a.capacity_factor, route_dim=width)
            self.moe.deepspeed_moe.gate = router
            experts = self.moe.deepspeed_moe.experts.deepspeed_experts
            first = expert_parallel_rank(a.ep_size) * len(experts)
            for local, e in enumerate(experts):
                e.reset_parameters(torch.Generator().manual_seed(expert_seed(cfg.train.seed, branch, first + local)))
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


class SemanticExtractor(nn.Module):
    """The first frozen CLIP text blocks, each followed by a residual bottleneck MLP, then LayerNorm + readout."""

    def __init__(self, width: int, hidden: int, blocks: int, out_dim: int | None):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
                                  for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False) if out_dim else None

    def forward(self, x: torch.Tensor, layers: nn.ModuleList, sep: torch.Tensor | None) -> torch.Tensor:
        for i, mlp in enumerate(self.mlps):
            x = block_forward(layers[i], x, causal=True, index=i)
            x = x + mlp(x)
        x = self.norm(x)
        if self.proj is None:  # semantic-agnostic: mean over all positions
            return x.mean(dim=1)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), sep])


class Discriminator(nn.Module):
    """F: [f_sa ; g] -> matched / mismatched logits (trained alternately with its own optimiser)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def mismatched(g: torch.Tensor) -> torch.Tensor:
    """Pair each caption with another sample's feature (a fixed derangement: the next one in the batch)."""
    return torch.roll(g, shifts=1, dims=0)


class DASD(nn.Module):
    def __init__(self, cfg: RunConfig, backbone: FrozenCLIP, embeddings: torch.Tensor):
        super().__init__()
        d = cfg.dasd
        self.stage = d.stage
        self.consistency_weight = d.consistency_weight
        self.logit_scale = d.logit_scale
        self.backbone = backbone
        width = backbone.text_width
        proj_dim = backbone.clip.config.projection_dim
        self.embedding = nn.Embedding.from_pretrained(embeddings.clone().float(), freeze=False)
        self.embedding_proj = nn.Linear(embeddings.shape[1], width)
        self.semantic_related = SemanticExtractor(width, d.extractor_hidden, d.extractor_blocks, proj_dim)
        self.semantic_agnostic = SemanticExtractor(width, d.extractor_hidden, d.extractor_blocks, None)
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
        f_sr = self.semantic_related(h, layers, sep)
        f_sa = self.semantic_agnostic(h, layers, None)
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

    def expert_counts(self) -> dict[str, list[int]]:
        return {f"text.{i}": a.expert_counts.tolist() for i, a in enumerate(self.adapters)
                if a.expert_counts is not None}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            f_en = self.backbone.encode_text(batch["en_text"], batch["en_eot"]).float()
        feature, f_sr, f_sa = self.encode_target(batch["text"], batch["eot"], batch["language"])
        feature, f_sr = feature.float(), f_sr.float()
        distill = F.mse_loss(feature, f_en)
        if self.stage == "cla":
            # the release uses SmoothL1 for the consistency term in both stages
            consistency = F.smooth_l1_loss(f_sr, f_en)
            loss = distill + self.consistency_weight * consistency
            anchor = f_en
            parts = {"mse": distill.detach(), "consistency": consistency.detach()}
        else:
            with torch.no_grad():
                image = self.backbone.encode_image(batch["image"]).float()
            nce = symmetric_info_nce(image, feature, logit_scale=self.logit_scale)
            consistency = F.smooth_l1_loss(f_sr, image)
            loss = nce + self.consistency_weight * consistency + distill
            anchor = image
            parts = {"nce": nce.detach(), "mse": distill.detach(), "consistency": consistency.detach()}
        return {"loss": loss, "f_sa": f_sa, "anchor": anchor, **parts}


def load_embedding_table(cfg: RunConfig, vocab_size: int) -> torch.Tensor:
    """mBERT's word embeddings (or a random table of ``dasd.embedding_dim`` when ``dasd.embeddings`` is null)."""
    if cfg.dasd.embeddings is None:
        return torch.randn(vocab_size, cfg.dasd.embedding_dim, generator=torch.Generator().manual_seed(0)) * 0.02
    table = AutoModel.from_pretrained(cfg.dasd.embeddings).get_input_embeddings().weight.detach().float()
    if table.shape[0] < vocab_size:
        raise ValueError(f"{cfg.dasd.embeddings} has {table.shape[0]} word embeddings but the tokenizer "
                         f"{cfg.dasd.tokenizer} has {vocab_size} ids")
    return table


class DASDMethod(Method):
    """Cross-lingual retrieval: (English, target) caption pairs (+ images in CMA), evaluation by recall per language."""

    selection_metric = "mAR"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        d = cfg.dasd
        self.languages = list(d.languages)
        self.load_images = d.stage == "cma"
        self.report_metrics = ("mAR", *(f"AR_{lang}" for lang in self.languages))
        self.english = CaptionEncoder(load_tokenizer(cfg.model.tokenizer or cfg.model.clip), cfg.model.text_length)
        self.target = CaptionEncoder(load_tokenizer(d.tokenizer), cfg.model.text_length)
        self.discriminator: Discriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None

    def build(self) -> DASD:
        torch.manual_seed(self.cfg.train.seed)  # identical non-expert (and discriminator) weights on every rank
        backbone = FrozenCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size)
        model = DASD(self.cfg, backbone, load_embedding_table(self.cfg, len(self.target.tokenizer)))
        self.discriminator = Discriminator(model.disc_in_dim)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.dasd.discriminator_lr)
        return model

    def train_texts(self) -> TranslationPairs:
        return TranslationPairs(self.english, self.target, self.languages)

    def train_languages(self) -> tuple[str, ...]:
        return tuple(self.languages)

    def backward(self, engine, out: dict) -> None:
        """Main step with the adversarial term, then one discriminator step on detached features."""
        disc = self.discriminator.to(out["f_sa"].device)
        f_sa, anchor = out["f_sa"].float(), out["anchor"].float()
        matched = torch.ones(f_sa.shape[0], dtype=torch.long, device=f_sa.device)
        # the main model tries to make mismatched pairs look matched: f_sa must not carry the semantics
        fool = F.cross_entropy(disc(torch.cat([f_sa, mismatched(anchor)], dim=-1)), matched)
        out["adversarial"] = fool.detach()
        engine.backward(out["loss"] + self.cfg.dasd.adversarial_weight * fool)

        self.disc_optimizer.zero_grad(set_to_none=True)  # drop what the main backward left in F
        f_sa = f_sa.detach()
        disc_loss = F.cross_entropy(disc(torch.cat([f_sa, anchor], dim=-1)), matched) + \
            F.cross_entropy(disc(torch.cat([f_sa, mismatched(anchor)], dim=-1)), torch.zeros_like(matched))
        disc_loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:  # identical F on every rank
            for p in disc.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(dist.get_world_size())
        self.disc_optimizer.step()
        out["discriminator"] = disc_loss.detach()

    def evaluate(self, evaluator, split: str) -> dict:
        model = evaluator.model
        result: dict = {}
        for index, lang in enumerate(self.languages):
            def encode(captions: list[str], index=index) -> dict:
                encoded = self.target.encode(captions)
                return {"text": encoded.ids, "eot": encoded.eot, "language": torch.full((len(captions),), index)}

            report = recall_report(evaluator, split, lang, encode,
                                   lambda b: model.encode_text(b["text"], b["eot"], b["language"]))
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


def recall_report(evaluator, split: str, language: str, encode, text_forward) -> dict:
    """recall_metrics of one language's captions against the split's images (features from ``evaluator``)."""
    image, image_ids, text, text_image_ids = evaluator.features(split, language, encode, text_forward)
    similarity = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).t()
    return {**recall_metrics(similarity, text_image_ids, image_ids), "images": int(image.shape[0]),
            "captions": int(text.shape[0])}


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


class EnglishFinetuneMethod(Method):
    selection_metric = "AR_en"
    report_metrics = ("AR_en",)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.english = CaptionEncoder(load_tokenizer(cfg.model.tokenizer or cfg.model.clip), cfg.model.text_length)

    def build(self) -> EnglishCLIP:
        torch.manual_seed(self.cfg.train.seed)
        backbone = TrainableCLIP(load_clip(self.cfg.model.clip), self.cfg.model.image_size)
        return EnglishCLIP(backbone, self.cfg.dasd.logit_scale)

    def train_texts(self) -> CaptionPairs:
        return CaptionPairs(self.english, SOURCE_LANGUAGE)

    def evaluate(self, evaluator, split: str) -> dict:
        model = evaluator.model

        def encode(captions: list[str]) -> dict:
            encoded = self.english.encode(captions)
            return {"text": encoded.ids, "eot": encoded.eot}

        report = recall_report(evaluator, split, SOURCE_LANGUAGE, encode, lambda b: model.encode_text(b["text"], b["eot"]))
        return {"AR_en": report["AR"], "en": report}

    def on_finish(self, model: EnglishCLIP, run_dir, rank: int) -> None:
        """Save the fine-tuned CLIP (and its tokenizer) where the next stages load it from."""
        if rank == 0:
            out = run_dir / "clip"
            model.backbone.clip.save_pretrained(out)
            self.english.tokenizer.save_pretrained(out)
        if dist.is_initialized():
            dist.barrier()
