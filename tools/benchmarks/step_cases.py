"""One DM-Adapter training step against what it could cost at least and at most, on the same shapes.

- ``dm``: DM-Adapter's step as training runs it (DeepSpeed engine: forward, backward, optimiser step).
- ``full``: fine-tuning all of CLIP with the SDM loss, in the same kind of engine (the ``full`` baseline's model).
- ``lora``: the ``lora`` baseline's model (rank 16 on the attention projections of both encoders), same engine.
- ``floor``: the frozen CLIP's forward and its backward as far as DM-Adapter's goes (through every block after the
  first, input gradients only), no weights to update: the least any adapter placed beside every block must cost.

CLIP ViT-B/16 with random weights (speed does not depend on the values), images 384x128, 77 tokens, one process
on one thread unless ``threads`` says otherwise. Each case also reports its peak memory: the process's peak resident
memory from before the CLIP is built to after the last step (weights, optimiser state, activations), the CPU's
counterpart of the GPU memory the papers report.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.measure import extra_peak_rss, report

SHAPES = {"clip": "vit-b16", "image_size": [384, 128], "text_length": 77, "batch": 4, "steps": 4, "warmup": 2}
QUICK_SHAPES = {"clip": "tiny", "image_size": [32, 16], "text_length": 16, "batch": 4, "steps": 2, "warmup": 1}
# the papers' memory comparison: batch 32 (one measured step after a warm-up one)
MEMORY_SHAPES = {**SHAPES, "batch": 32, "steps": 1, "warmup": 1}


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


def step_case(variant: str, options: dict) -> None:
    from dsmoe import distributed
    from dsmoe.config import DEFAULT_DEMO_CONFIG, load_config

    shapes = options["shapes"]
    size = tuple(shapes["image_size"])
    cfg = load_config(DEFAULT_DEMO_CONFIG.parent / "cuhk_pedes.yaml",
                      [f"model.image_size=[{size[0]}, {size[1]}]", f"model.text_length={shapes['text_length']}",
                       f"train.batch_size={shapes['batch']}", "train.precision=fp32"])
    distributed.init_distributed(600, threads=options["threads"])
    memory: dict = {}
    with extra_peak_rss(memory):
        times = _timed_steps(variant, cfg, shapes, size)
    report({"seconds": statistics.median(times), "step_times": times, "threads": torch.get_num_threads(),
            "peak_mib": memory["extra_rss_mib"]})
    distributed.shutdown()


def _timed_steps(variant: str, cfg, shapes: dict, size: tuple[int, int]) -> list[float]:
    from dsmoe.backbones.clip import FrozenCLIP, TrainableCLIP
    from dsmoe.ds_config import DeviceSupport, compose_ds_config, load_ds_config
    from dsmoe.engine import build_training_engine
    from dsmoe.losses import sdm_loss
    from dsmoe.methods.baselines.config import LoRAConfig
    from dsmoe.methods.baselines.method import LoRACLIP, SDMRetrieval
    from dsmoe.methods.dm_adapter.method import DMAdapter

    torch.manual_seed(0)
    clip = _clip(shapes["clip"])
    vocab = clip.config.text_config.vocab_size
    if variant == "floor":
        backbone = FrozenCLIP(clip, size)
        rest = torch.zeros(())

        # the gradient stops where DM-Adapter's does: adapters sit beside every block and nothing before the first
        # one trains, so the backward runs through blocks 1.. (input gradients only) to the residual stream after
        # block 0, here a leaf added there
        def after_first_block(index, x):
            return torch.zeros_like(x, requires_grad=True) if index == 0 else rest

        def step(batch):
            loss = sdm_loss(backbone.encode_image(batch["image"], parallel=after_first_block),
                            backbone.encode_text(batch["text"], batch["eot"], parallel=after_first_block),
                            batch["pid"], logit_scale=50.0)
            loss.backward()
    else:
        models = {"dm": lambda: DMAdapter(cfg, FrozenCLIP(clip, size)),
                  "full": lambda: SDMRetrieval(TrainableCLIP(clip, size), logit_scale=50.0),
                  "lora": lambda: SDMRetrieval(LoRACLIP(clip, size, LoRAConfig()), logit_scale=50.0)}
        ds = compose_ds_config(load_ds_config(shapes.get("ds_config", "zero2.json")), cfg, 1, DeviceSupport.detect())
        engine = build_training_engine(cfg, models[variant](), ds, schedule=lambda step: 1.0).engine

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
    return times
