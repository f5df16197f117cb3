"""A frozen transformers ``CLIPModel`` with explicit block-level forward passes.

dsmoe runs CLIP's blocks itself (same maths as transformers) so methods can add branches inside a block
(DM-Adapter: parallel to the MLP) or after it (DASD), and so non-square images use a position
embedding resized once, bilinearly, from the pretrained square grid.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

# branch(block_index, hidden_state) -> tensor added to the residual stream
ParallelBranch = Callable[[int, torch.Tensor], torch.Tensor]


def load_clip(name_or_path: str) -> CLIPModel:
    """Load CLIP from a hub id, a local directory, or a weights file of OpenAI's or open_clip's (converted in
    memory: ``dsmoe.backbones.openai_clip``); weights in fp32."""
    from dsmoe.config import is_weights_file

    if is_weights_file(name_or_path):
        from dsmoe.backbones.openai_clip import load_openai_clip

        return load_openai_clip(name_or_path)
    return CLIPModel.from_pretrained(name_or_path, dtype=torch.float32)


def random_vit_b16_clip() -> CLIPModel:
    """OpenAI CLIP ViT-B/16's architecture with random weights (sizes, speed and memory without a download;
    transformers' default CLIPConfig is ViT-B/32: only the patch differs)."""
    from transformers import CLIPConfig

    return CLIPModel(CLIPConfig(vision_config={"patch_size": 16}, projection_dim=512))


def resize_position_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a [1 + n*n, d] ViT position embedding (class token first) to ``grid`` (rows, cols)."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    side = int(round(patch_pos.shape[0] ** 0.5))
    assert side * side == patch_pos.shape[0], "pretrained position grid must be square"
    if (side, side) == tuple(grid):
        return pos.clone()
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def attention(layer: CLIPEncoderLayer, x: torch.Tensor, causal: bool) -> torch.Tensor:
    attn = layer.self_attn
    batch, length, dim = x.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, length, heads, dim // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x)),
                                         is_causal=causal)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def block_forward(layer: CLIPEncoderLayer, x: torch.Tensor, causal: bool, index: int,
                  parallel: ParallelBranch | None = None) -> torch.Tensor:
    """``x + attn(ln1 x)``, then ``x + mlp(ln2 x) [+ parallel(index, x)]``."""
    x = x + attention(layer, layer.layer_norm1(x), causal)
    out = x + layer.mlp(layer.layer_norm2(x))
    if parallel is not None:
        out = out + parallel(index, x)
    return out


class FrozenCLIP(nn.Module):
    """CLIP with every parameter frozen, encoding images of ``image_size`` and token ids."""

    def __init__(self, clip: CLIPModel, image_size: tuple[int, int]):
        super().__init__()
        vision = clip.config.vision_config
        patch = vision.patch_size
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.clip = clip
        self.image_size = tuple(image_size)
        self.grid = (image_size[0] // patch, image_size[1] // patch)
        pos = clip.vision_model.embeddings.position_embedding.weight.detach()
        self.register_buffer("image_positions", resize_position_embedding(pos, self.grid), persistent=False)
        # DeepSpeed's initial broadcast cannot handle 0-d parameters; CLIP's (unused) logit_scale is one.
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        clip.requires_grad_(False)
        clip.eval()

    def train(self, mode: bool = True):  # the frozen backbone stays in eval mode
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def image_width(self) -> int:
        return self.clip.config.vision_config.hidden_size

    @property
    def text_width(self) -> int:
        return self.clip.config.text_config.hidden_size

    @property
    def num_image_blocks(self) -> int:
        return len(self.clip.vision_model.encoder.layers)

    @property
    def num_text_blocks(self) -> int:
        return len(self.clip.text_model.encoder.layers)

    def encode_image(self, pixels: torch.Tensor, parallel: ParallelBranch | None = None) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> projected CLS features [B, D] (not normalised).

        Videos, [B, N, 3, H, W]: every frame is encoded and the features are averaged (CLIP4Clip's mean pooling).
        """
        if pixels.dim() == 5:
            batch, frames = pixels.shape[:2]
            return self.encode_image(pixels.flatten(0, 1), parallel).view(batch, frames, -1).mean(dim=1)
        vm = self.clip.vision_model
        emb = vm.embeddings
        pixels = pixels.to(emb.patch_embedding.weight.dtype)
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.image_positions.to(x.dtype)
        x = vm.pre_layrnorm(x)
        for i, layer in enumerate(vm.encoder.layers):
            x = block_forward(layer, x, causal=False, index=i, parallel=parallel)
        return self.clip.visual_projection(vm.post_layernorm(x[:, 0]))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        tm = self.clip.text_model
        positions = tm.embeddings.position_embedding.weight[: input_ids.shape[1]]
        return tm.embeddings.token_embedding(input_ids) + positions

    def encode_text(self, input_ids: torch.Tensor, eot_positions: torch.Tensor,
                    parallel: ParallelBranch | None = None) -> torch.Tensor:
        """[B, L] token ids -> projected features at each caption's end-of-text position [B, D]."""
        tm = self.clip.text_model
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(tm.encoder.layers):
            x = block_forward(layer, x, causal=True, index=i, parallel=parallel)
        x = tm.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions]
        return self.clip.text_projection(pooled)


class TrainableCLIP(FrozenCLIP):
    """The same encoders with CLIP's weights trained (DASD's optional English fine-tune stage).

    The (resized) position embedding and the unused logit scale stay fixed, so ``clip.save_pretrained`` keeps
    everything a later stage needs: it re-derives the identical resized embedding when it loads the model.
    """

    def __init__(self, clip: CLIPModel, image_size: tuple[int, int]):
        super().__init__(clip, image_size)
        clip.requires_grad_(True)
        clip.logit_scale.requires_grad_(False)
        clip.vision_model.embeddings.position_embedding.requires_grad_(False)

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)
