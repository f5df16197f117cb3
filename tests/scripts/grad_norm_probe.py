"""Launched with 2 ranks by tests/test_ds_matrix.py: one DeepSpeed step on fixed per-rank batches, ep_size 2.

Writes the global gradient norm DeepSpeed reports (before clipping) to --out, for comparison with the norm of
the same step computed in a single process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dsmoe import distributed  # noqa: E402
from dsmoe.config import load_config  # noqa: E402
from dsmoe.ds_config import CPU_ONLY, compose_ds_config, load_ds_config  # noqa: E402
from dsmoe.optim import param_groups  # noqa: E402
from dsmoe.methods.registry import get_method  # noqa: E402


def probe_config(clip_dir: str, ep_size: int):
    return load_config(None, ["demo=false", "data.shards=/unused", f"model.clip={clip_dir}", f"adapter.ep_size={ep_size}",
                              "model.image_size=[32, 32]", "model.text_length=16", "train.batch_size=8",
                              "dm_adapter.caption_corruption=0", "optim.grad_clip=0"])


def probe_batch(method, rank: int, size: int = 4) -> dict:
    """A deterministic batch per rank (random pixels, real captions)."""
    g = torch.Generator().manual_seed(100 + rank)
    words = ["a woman in a red top", "the man wears a green shirt", "someone in blue jeans", "a black bag"]
    captions = [words[(rank + i) % 4] + " and " + words[(rank + 2 * i + 1) % 4] for i in range(size)]
    encoded = method.captions.encode(captions)
    return {"image": torch.randn(size, 3, 32, 32, generator=g), "text": encoded.ids, "eot": encoded.eot,
            "pid": torch.tensor([rank * 10 + i // 2 for i in range(size)])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    rank, world, _ = distributed.init_distributed()
    cfg = probe_config(args.clip, ep_size=2)
    method = get_method(cfg)
    model = method.build()
    ds = compose_ds_config(load_ds_config(args.ds_config), cfg, world, CPU_ONLY)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim), config=ds)
    out = engine(probe_batch(method, rank))
    engine.backward(out["loss"])
    engine.step()
    norm = float(engine.get_global_grad_norm())
    if rank == 0:
        Path(args.out).write_text(json.dumps({"norm": norm, "stage": ds["zero_optimization"]["stage"]}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
