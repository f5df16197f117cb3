"""OpenAI's own CLIP files load directly: a model of OpenAI's published CLIP ViT architecture (written out below,
random weights, small), saved the three ways users hold it (a TorchScript archive like ``ViT-B-16.pt``, a plain
state dict, an open_clip checkpoint), gives through dsmoe's loader the image and text features of its own forward
pass: at its native square resolution, and at 384x128 with the position embedding resized bilinearly as the
release resizes it."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.backbones.clip import FrozenCLIP, load_clip
from dsmoe.config import load_config

WIDTH, TEXT_WIDTH, LAYERS, PATCH, GRID, EMBED, CONTEXT, VOCAB = 128, 64, 2, 16, 4, 32, 77, 49408


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """OpenAI's residual attention block: x + attn(ln_1 x), then x + mlp(ln_2 x); nn.MultiheadAttention."""

    def __init__(self, width: int, causal: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.causal = causal

    def forward(self, x):  # [L, B, D], as OpenAI's
        mask = torch.zeros(x.shape[0], x.shape[0])
        if self.causal:
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, causal: bool):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(GRID * GRID + 1, WIDTH) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS, causal=False)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * 0.1)

    def forward(self, x, positions):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + positions
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
    """OpenAI's CLIP ViT: the parameter names and maths of its published model."""

    def __init__(self):
        super().__init__()
        self.visual = Visual()
        self.token_embedding = nn.Embedding(VOCAB, TEXT_WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, TEXT_WIDTH) * 0.01)
        self.transformer = Transformer(TEXT_WIDTH, LAYERS, causal=True)
        self.ln_final = nn.LayerNorm(TEXT_WIDTH)
        self.text_projection = nn.Parameter(torch.randn(TEXT_WIDTH, EMBED) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for p in self.parameters():  # LayerNorms and biases away from their initial values too
            p.data.add_(torch.randn_like(p) * 0.02)

    def encode_image(self, pixels: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.visual(pixels, self.visual.positional_embedding if positions is None else positions)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def release_resized_positions(posemb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """IRRA / DM-Adapter's ``resize_pos_embed``: the class token kept, the square grid resized bilinearly."""
    token, grid = posemb[:1], posemb[1:]
    side = int(grid.shape[0] ** 0.5)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear")
    return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(height * width, -1)])


@pytest.fixture(scope="module")
def reference() -> OpenAICLIP:
    torch.manual_seed(0)
    return OpenAICLIP().eval()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, str]:
    """The reference saved the ways users hold OpenAI's CLIP."""
    root = tmp_path_factory.mktemp("openai")
    torch.jit.save(torch.jit.script(reference), str(root / "ViT-B-16.pt"))
    torch.save(reference.state_dict(), root / "plain.pt")
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               root / "open_clip.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(root / "open_clip.safetensors"))
    return {name: str(root / name) for name in ("ViT-B-16.pt", "plain.pt", "open_clip.pt", "open_clip.safetensors")}


def _captions(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as the releases make them: start, words, end, then zeros; and each caption's end position."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(batch, CONTEXT, dtype=torch.long)
    ends = torch.tensor([5, 11, CONTEXT - 1])
    for row, end in enumerate(ends.tolist()):
        ids[row, 0], ids[row, end] = 49406, 49407
        ids[row, 1:end] = torch.randint(1, 49405, (end - 1,), generator=generator)
    return ids, ends


@pytest.mark.parametrize("name", ["ViT-B-16.pt", "plain.pt", "open_clip.pt", "open_clip.safetensors"])
def test_openai_files_load_with_the_releases_features(name, reference, files):
    clip = load_clip(files[name])
    assert clip.config.vision_config.hidden_act == "quick_gelu" and clip.config.projection_dim == EMBED
    torch.manual_seed(2)
    with torch.no_grad():
        square = FrozenCLIP(clip, (GRID * PATCH, GRID * PATCH))
        pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
        torch.testing.assert_close(square.encode_image(pixels), reference.encode_image(pixels),
                                   rtol=1e-4, atol=1e-5)
        ids, ends = _captions()
        torch.testing.assert_close(square.encode_text(ids, ends), reference.encode_text(ids), rtol=1e-4, atol=1e-5)
        person = FrozenCLIP(load_clip(files[name]), (384, 128))
        pixels = torch.randn(2, 3, 384, 128)
        positions = release_resized_positions(reference.visual.positional_embedding, 384 // PATCH, 128 // PATCH)
        torch.testing.assert_close(person.encode_image(pixels), reference.encode_image(pixels, positions),
                                   rtol=1e-4, atol=1e-5)


def test_a_weights_file_is_a_model_clip_the_config_checks(files, tmp_path):
    cfg = load_config(None, ["demo=false", "data.shards=/x", f"model.clip={files['ViT-B-16.pt']}"])
    cfg.check_models()
    assert cfg.model.tokenizer_source() == "openai/clip-vit-base-patch16"  # OpenAI's files hold no tokenizer
    missing = load_config(None, ["demo=false", "data.shards=/x", f"model.clip={tmp_path / 'ViT-L-14.pt'}"])
    with pytest.raises(Exception, match="model.clip=.*ViT-L-14.pt: no such file"):
        missing.check_models()
    with pytest.raises(ValueError, match="not an OpenAI-layout CLIP"):
        torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
        load_clip(str(tmp_path / "other.pt"))
