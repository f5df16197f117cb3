"""Training-step speed and peak memory of DM-Adapter at paper scale (a benchmark, not a test: it prints figures).

    deepspeed --num_gpus 8 tools/bench_train.py --ds_config ds_configs/zero2_bf16.json        # 8 GPUs, bf16
    deepspeed --num_gpus 1 tools/bench_train.py --ds_config ds_configs/zero2_bf16.json --batch 32
    python tools/bench_train.py --ds_config ds_configs/zero2_fp32.json --batch 2 --steps 2   # one CPU process

The model is the recipe's (``--config``, default CUHK-PEDES: ViT-B/16 at 384x128, 77 tokens, 6 experts top-2 in
every block of both encoders) with ``--clip random-vit-b16`` (the default: CLIP ViT-B/16's architecture with
random weights; speed and memory do not depend on the values) or a CLIP path / hub id. ``--set key=value``
overrides the YAML as in train.py. Each rank runs ``--warmup`` untimed then ``--steps`` timed DeepSpeed steps
(forward, backward, optimiser) on synthetic batches of ``--batch`` image-caption pairs; the data pipeline is
left out (``tools/bench_shards.py`` measures it). Rank 0 prints one JSON line: the median step time, pairs/s
over all ranks, and the peak memory of rank 0 (GPU: allocated and reserved by torch; CPU: the process's peak RSS).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import checkout  # noqa: F401  (dsmoe importable from a checkout)

import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from dsmoe.distributed import process_group  # noqa: E402
from dsmoe.backbones.clip import FrozenCLIP, load_clip, random_vit_b16_clip  # noqa: E402
from dsmoe.config import DEFAULT_DEMO_CONFIG, ConfigError, RunConfig, load_config  # noqa: E402
from dsmoe.ds_config import DEFAULT, DeviceSupport, compose_ds_config, load_ds_config  # noqa: E402
from dsmoe.engine import build_training_engine, device_for  # noqa: E402
from dsmoe.launcher import launched_world_size  # noqa: E402
from dsmoe.methods.dm_adapter.method import DMAdapter  # noqa: E402

RANDOM_VIT_B16 = "random-vit-b16"
MIB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", "--deepspeed_config", default=str(DEFAULT))
    parser.add_argument("--config", default=str(DEFAULT_DEMO_CONFIG.parent / "cuhk_pedes.yaml"))
    parser.add_argument("--clip", default=RANDOM_VIT_B16, help=f"{RANDOM_VIT_B16}, or a CLIP path or hub id")
    parser.add_argument("--batch", type=int, default=16, help="image-caption pairs per rank and step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2 (pairs of one person), --steps >= 1, --warmup >= 0")
    return args


def synthetic_batch(cfg: RunConfig, clip_vocab: int, size: int, rank: int, step: int, device, dtype) -> dict:
    """Random pixels and token ids; captions of random length ending in the end-of-text id; two per person."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    length = cfg.model.text_length
    ids = torch.randint(1, clip_vocab - 2, (size, length), generator=g)
    eot = torch.randint(length // 4, length, (size,), generator=g)
    ids[torch.arange(size), eot] = clip_vocab - 1
    ids[torch.arange(length)[None, :] > eot[:, None]] = 0
    return {"image": torch.randn(size, 3, *cfg.model.image_size, generator=g).to(device, dtype),
            "text": ids.to(device), "eot": eot.to(device),
            "pid": (torch.arange(size) // 2 + rank * size).to(device)}


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_allocated_MiB": round(torch.cuda.max_memory_allocated(device) / MIB, 1),
                "peak_reserved_MiB": round(torch.cuda.max_memory_reserved(device) / MIB, 1)}
    return {"peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = launched_world_size()
    try:
        cfg = load_config(args.config, [f"train.batch_size={args.batch * world}", "train.grad_accum=1", *args.set])
        cfg.check_world(world)
        ds = compose_ds_config(load_ds_config(args.ds_config), cfg, world, DeviceSupport.detect())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with process_group(cfg.train) as (rank, world, local_rank):
        measure(args, cfg, ds, rank, world, local_rank)
    return 0


def measure(args: argparse.Namespace, cfg: RunConfig, ds: dict, rank: int, world: int, local_rank: int) -> None:
    """Time ``args.steps`` steps after ``args.warmup`` and print rank 0's figures."""
    device = device_for(local_rank)
    torch.manual_seed(cfg.train.seed)
    clip = random_vit_b16_clip() if args.clip == RANDOM_VIT_B16 else load_clip(args.clip)
    built = build_training_engine(cfg, DMAdapter(cfg, FrozenCLIP(clip, cfg.model.image_size)), ds,
                                  schedule=lambda step: 1.0)  # the base learning rate throughout
    engine = built.engine
    dtype, vocab = built.dtype, clip.config.text_config.vocab_size
    accelerator = get_accelerator()
    times = []
    for step in range(args.warmup + args.steps):
        batch = synthetic_batch(cfg, vocab, args.batch, rank, step, device, dtype)
        accelerator.synchronize()
        start = time.perf_counter()
        engine.backward(engine(batch)["loss"])
        engine.step()
        accelerator.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if rank == 0:
        print(json.dumps({
            "device": accelerator.device_name(), "world_size": world, "ep_size": cfg.adapter.ep_size,
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "dtype": str(dtype).removeprefix("torch."),
            "clip": args.clip, "image_size": list(cfg.model.image_size), "text_length": cfg.model.text_length,
            "experts": cfg.adapter.num_experts, "top_k": cfg.adapter.top_k, "batch_per_rank": args.batch,
            "trainable_params_rank0": built.trainable_parameters,
            "threads_per_rank": torch.get_num_threads(),
            "steps": args.steps, "step_s_median": round(step_s, 4), "step_s_max": round(max(times), 4),
            "pairs_per_s": round(args.batch * world / step_s, 2), **peak_memory(device)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
