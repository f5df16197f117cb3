"""Shared fixtures: a one-rank process group for DeepSpeed's MoE layer and a tiny CLIP saved on disk."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from launch import extensions_dir

# A few captions for the tiny tokenizer (word level): enough words for short and truncated captions.
TINY_CAPTIONS = [
    "a woman in a red top and black trousers carries a blue backpack",
    "the man wears a green shirt with white shorts and a yellow hat",
    "a person in an orange jacket over purple skirt walks with a handbag",
    "someone wearing blue jeans and a black coat has long blond hair",
]
TINY_IMAGE = 16  # square pre-training resolution of the tiny CLIP (a 2x2 grid of 8x8 patches)
TINY_PATCH = 8
TINY_TEXT_POSITIONS = 16


@pytest.fixture(scope="session")
def dist_env() -> None:
    """A one-process gloo group, as ``dsmoe.distributed.init_distributed`` makes it without a launcher."""
    import torch.distributed as dist

    from dsmoe.distributed import init_distributed

    if not dist.is_initialized():
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        init_distributed(timeout_s=600)
    assert dist.is_initialized() and dist.get_world_size() == 1
    yield


def wire_moe(model: nn.Module) -> nn.Module:
    """Give every MoE adapter its expert-parallel group (what ``deepspeed.initialize`` does)."""
    from dsmoe.moe.adapter import AdapterBranch

    for module in model.modules():
        if isinstance(module, AdapterBranch) and module.moe is not None:
            module.moe.set_deepspeed_parallelism()
    return model


@pytest.fixture
def wire(dist_env) -> Callable[[nn.Module], nn.Module]:
    return wire_moe


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny ``CLIPModel`` and its word-level tokenizer, saved in one directory."""
    from transformers import CLIPConfig, CLIPModel

    from dsmoe.demo.models import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = train_tokenizer(TINY_CAPTIONS, out)
    assert tokenizer.eos_token_id != 2, "transformers would pool at the largest id for eos id 2"
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TINY_TEXT_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=TINY_IMAGE, patch_size=TINY_PATCH),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    return out


@pytest.fixture
def tiny_clip(tiny_clip_dir: Path):
    """A fresh copy of the tiny CLIP (FrozenCLIP modifies the model it wraps)."""
    from dsmoe.backbones.clip import load_clip

    return load_clip(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_clip_dir: Path):
    from dsmoe.data.text import load_tokenizer

    return load_tokenizer(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """The DM-Adapter demo's kind of synthetic shards and tiny CLIP, with a quarter of its training people (the
    tests train a few steps), built once per session in a temporary directory."""
    return person_demo_assets(tmp_path_factory.mktemp("demo"))


TEST_PEOPLE = {"train": 96, "val": 24, "test": 24}


def person_demo_assets(root: Path, people: dict[str, int] = TEST_PEOPLE) -> dict[str, str]:
    """The DM-Adapter demo's assets under ``root`` with ``people`` per split, and the ``--set`` values that run the
    demo recipe on them as they are (demo=false: the recipe's demo: true would rebuild them at the demo's size)."""
    from dsmoe.config import load_config
    from dsmoe.demo import prepare_person_demo

    cfg = load_config(None, [f"model.clip={root / 'tiny-clip'}", f"demo_dir={root}",
                             f"data.shards={root / 'shards'}"])
    prepare_person_demo(root, cfg.model, people)
    return {"demo_dir": str(root), "model.clip": str(root / "tiny-clip"), "data.shards": str(root / "shards"),
            "demo": "false"}


@pytest.fixture
def signals():
    """Restore the process's SIGTERM/SIGUSR1/SIGINT handlers after a Trainer installed its preemption watch."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
