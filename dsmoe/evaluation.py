"""Evaluation: features of a split's images and captions computed by every rank in lockstep and gathered, the
completeness of the split, results tables, and scoring a saved checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from dsmoe.config import RunConfig
from dsmoe.data.faults import SampleFault, bad_sample_limit, summarize
from dsmoe.data.pipeline import eval_loader
from dsmoe.distributed import flag_tensor
from dsmoe.engine import build_inference_engine, device_for, engine_dtype
from dsmoe.faults import RunError
from dsmoe.shards.format import read_split


class Evaluator:
    """Features of a split's images and captions with every rank in lockstep, gathered on all ranks."""

    def __init__(self, cfg: RunConfig, engine, device: torch.device):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.model = engine.module
        self.dtype = engine_dtype(engine)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.missing: dict[str, dict[str, SampleFault]] = {}  # split -> unusable samples (every rank's)

    def _lockstep(self, batches: Iterable[dict], dummy: dict) -> Iterator[tuple[dict, bool]]:
        """Yield (batch, real) until every rank is done; a finished rank runs ``dummy`` so MoE collectives match."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            flag = flag_tensor(0 if batch is None else 1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 0:
                return
            yield (batch, True) if batch is not None else (dummy, False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def features(self, split: str, language: str, encode: Callable[[list[str]], dict],
                 text_forward: Callable[[dict], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(image features, image labels, caption features, caption labels) of every sample of ``split``.

        ``encode`` turns captions into a batch of tensors and ``text_forward`` that batch into features; each
        caption's label is its image's (person id, or image id for image-text data).
        """
        cfg = self.cfg
        self.engine.eval()
        h, w = cfg.model.image_size
        images, image_labels, captions, caption_labels = [], [], [], []
        loader = eval_loader(cfg.data.eval_shards or cfg.data.shards, split, cfg.model.image_size, self.rank,
                             self.world_size, cfg.train.eval_batch_size, cfg.data.workers, language)
        dummy_image = {"image": torch.zeros(1, 3, h, w), "pid": torch.zeros(1, dtype=torch.long), "captions": []}
        faults: list[SampleFault] = []
        for batch, real in self._lockstep(loader, dummy_image):
            if real:
                faults += batch["faults"]
                if batch["image"] is None:  # nothing usable in this batch: the dummy keeps MoE collectives matched
                    batch, real = dummy_image, False
            feats = self.model.encode_image(batch["image"].to(self.device, self.dtype)).float().cpu()
            if real:
                images.append(feats)
                image_labels.append(batch["pid"])
                for label, caps in zip(batch["pid"].tolist(), batch["captions"]):
                    captions.extend(caps)
                    caption_labels.extend([label] * len(caps))
        size = cfg.train.eval_batch_size
        chunks = ((captions[i:i + size], caption_labels[i:i + size]) for i in range(0, len(captions), size))
        texts, text_labels = [], []
        for (chunk, labels), real in self._lockstep(chunks, ([""], [0])):
            feats = text_forward(self._to_device(encode(chunk))).float().cpu()
            if real:
                texts.append(feats)
                text_labels.append(torch.tensor(labels))
        self.engine.train()
        local = [_cat(images, 1), _cat(image_labels), _cat(texts, 1), _cat(text_labels), faults]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        self._check_missing(split, [f for g in gathered for f in g[4]])
        return tuple(torch.cat([g[i] for g in gathered if g[i].numel()]) for i in range(4))

    def _check_missing(self, split: str, faults: list[SampleFault]) -> None:
        """Remember the split's unusable samples; past the run's limit, stop (on every rank alike)."""
        data = self.cfg.data
        self.missing[split] = {f.identity: f for f in faults}
        samples = read_split(data.eval_shards or data.shards, split).samples
        limit = bad_sample_limit(data.max_bad_share, data.max_bad_count, samples)
        if len(faults) > limit:
            raise RunError(f"{len(faults)} of {samples} samples of the evaluation split '{split}' are unusable, more "
                           f"than the limit of {limit} (data.max_bad_share / data.max_bad_count):\n  "
                           + "\n  ".join(summarize(faults)))

    def completeness(self, split: str) -> dict:
        """What the last evaluation of ``split`` left out: scores over fewer queries are not comparable."""
        faults = self.missing.get(split, {})
        if not faults:
            return {}
        return {"incomplete": {"missing_samples": len(faults), "reasons": summarize(faults.values())}}


def _cat(parts: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    if parts:
        return torch.cat(parts)
    return torch.zeros(0, width) if width is not None else torch.zeros(0, dtype=torch.long)


def format_results(results: dict, keys: tuple[str, ...]) -> str:
    rows = [(results.get("start_label", "untrained"), results.get("zero_shot")), ("trained", results["test"])]
    width = max(8, *(len(k) + 2 for k in keys))
    lines = [f"{'test split':<12}" + "".join(f"{k:>{width}}" for k in keys)]
    for name, metrics in rows:
        if metrics:
            lines.append(f"{name:<12}" + "".join(f"{metrics[k]:{width}.2f}" for k in keys))
    lines.append(f"model selection: {results['model_selection']}")
    return "\n".join(lines)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path, split: str, local_rank: int) -> dict[str, float]:
    """Score ``split`` with a saved run's adapters (any world size / ep_size)."""
    method, engine, source = build_inference_engine(cfg, checkpoint)
    evaluator = Evaluator(cfg, engine, device_for(local_rank))
    metrics = method.evaluate(evaluator, split)
    return {"checkpoint": source, "split": split, **metrics, **evaluator.completeness(split)}
