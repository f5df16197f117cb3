"""One DM-Adapter training step against what it could cost at least and at most, on the same shapes.

- ``dm``: DM-Adapter's step as training runs it (DeepSpeed engine: forward, backward, optimiser step).
- ``full``: fine-tuning all of CLIP with the same loss, in the same kind of engine.
- ``floor``: the frozen CLIP's forward and its backward down to the inputs, no weights to update: the least any
  adapter placed in every block must cost (the backward has to run through every block to reach them).

CLIP ViT-B/16 with random weights (speed does not depend on the values), images 384x128, 77 tokens, one process
on one thread unless ``threads`` says otherwise.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from benchmarks.measure import report

SHAPES = {"clip": "vit-b16", "image_size": [384, 128], "text_length": 77, "batch": 4, "steps": 4, "warmup": 2}
QUICK_SHAPES = {"clip": "tiny", "image_size": [32, 16], "text_length": 16, "batch": 4, "steps": 2, "warmup": 1}


def _clip(name: str):
    from dsmoe.backbones.clip import random_vit_b16_clip

    if name == "vit-b16":
        return random_vit_b16_clip()
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                     "max_position_embeddings": 32, "vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32))


def _batch(size: int, image_size, length: int, vocab: int, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, vocab - 2, (size, length), generator=g)
    eot = torch.randint(length // 4, length, (size,), generator=g)
    ids[torch.arange(size), eot] = vocab - 1
    return {"image": torch.randn(size, 3, *image_size, generator=g), "text": ids, "eot": eot,
            "pid": torch.arange(size) // 2}


class FullFinetune(nn.Module):
    """Every CLIP weight trained with DM-Adapter's SDM loss."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict) -> dict:
        from dsmoe.losses import sdm_loss

        image = self.backbone.encode_image(batch["image"])
        text = self.backbone.encode_text(batch["text"], batch["eot"])
        return {"loss": sdm_loss(image, text, batch["pid"], logit_scale=50.0)}


def step_case(variant: str, options: dict) -> None:
    from dsmoe import distributed
    from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP
    from dsmoe.config import DEFAULT_DEMO_CONFIG, load_config
    from dsmoe.ds_config import DeviceSupport, compose_ds_config, load_ds_config
    from dsmoe.engine import build_training_engine
    from dsmoe.losses import sdm_loss
    from dsmoe.methods.dm_adapter.method import DMAdapter

    shapes = options["shapes"]
    size = tuple(shapes["image_size"])
    cfg = load_config(DEFAULT_DEMO_CONFIG.parent / "cuhk_pedes.yaml",
                      [f"model.image_size=[{size[0]}, {size[1]}]", f"model.text_length={shapes['text_length']}",
                       f"train.batch_size={shapes['batch']}", "train.precision=fp32"])
    distributed.init_distributed(600, threads=options["threads"])
    torch.manual_seed(0)
    clip = _clip(shapes["clip"])
    vocab = clip.config.text_config.vocab_size
    if variant == "floor":
        backbone = FrozenCLIP(clip, size)
        # the text's path back to its input: token embeddings as a leaf that wants a gradient (no weight gradient)
        backbone.clip.text_model.embeddings.token_embedding.register_forward_hook(
            lambda module, args, out: out.detach().requires_grad_(True))

        def step(batch):
            pixels = batch["image"].requires_grad_(True)
            loss = sdm_loss(backbone.encode_image(pixels), backbone.encode_text(batch["text"], batch["eot"]),
                            batch["pid"], logit_scale=50.0)
            loss.backward()
    else:
        model = DMAdapter(cfg, FrozenCLIP(clip, size)) if variant == "dm" else FullFinetune(TrainableCLIP(clip, size))
        ds = compose_ds_config(load_ds_config("zero2.json"), cfg, 1, DeviceSupport.detect())
        engine = build_training_engine(cfg, model, ds, schedule=lambda step: 1.0).engine

        def step(batch):
            engine.backward(engine(batch)["loss"])
            engine.step()
    times = []
    for n in range(shapes["warmup"] + shapes["steps"]):
        batch = _batch(shapes["batch"], size, shapes["text_length"], vocab, n)
        start = time.perf_counter()
        step(batch)
        if n >= shapes["warmup"]:
            times.append(time.perf_counter() - start)
    report({"seconds": statistics.median(times), "step_times": times, "threads": torch.get_num_threads()})
    distributed.shutdown()
