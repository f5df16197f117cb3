"""Evaluation: a split's images read once (whole shards per rank), its captions in one language encoded by every
rank in lockstep, the features gathered to every rank in split order, and the metrics computed from them block by
block with the blocks shared between ranks; the completeness of the split, and results tables."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsmoe.config import RunConfig
from dsmoe.methods.base import SplitFeatures
from dsmoe.data.bad_samples import SampleFault, bad_sample_limit, summarize
from dsmoe.data.pipeline import eval_loader
from dsmoe.data.transforms import normalize
from dsmoe.distributed import flag_tensor
from dsmoe.engine import engine_dtype
from dsmoe.failures import RunError
from dsmoe.progress import Phase
from dsmoe.data.format import read_split


@dataclass
class Gallery:
    """A split's images to retrieve from, in split order: L2-normalised features (as ``SplitFeatures.images``) and
    each sample's split index, label, shard key and captions by language."""

    features: torch.Tensor  # [N, D]
    labels: torch.Tensor  # [N]
    indices: list[int]
    keys: list[str]
    captions: list[dict[str, list[str]]]


@dataclass
class _ImagePass:
    features: torch.Tensor  # every rank's, normalised, in split order
    labels: torch.Tensor
    local: list[tuple[int, int, dict[str, list[str]], str]]  # this rank's samples: (split index, label, captions, key)


class EvaluationStopped(Exception):
    """A stop or requeue signal reached a rank during an evaluation: every rank leaves it at the same batch.
    ``request``: the strongest request any rank received (``dsmoe.preemption``)."""

    def __init__(self, request: int):
        super().__init__(f"evaluation stopped (request {request})")
        self.request = request


class Evaluator:
    """Features of a split's images and captions with every rank in lockstep, and how ranks share the metrics.
    ``stop_request()``: this rank's pending preemption request (0: none), read at every batch."""

    def __init__(self, cfg: RunConfig, engine, device: torch.device, stop_request: Callable[[], int] = lambda: 0):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.stop_request = stop_request
        self.model = engine.module
        self.dtype = engine_dtype(engine)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.missing: dict[str, dict[str, SampleFault]] = {}  # split -> unusable samples (every rank's)
        self._images: dict[str, _ImagePass] = {}  # the evaluation in progress: its splits' image passes

    def evaluate(self, method, split: str) -> dict:
        """``method.evaluate(self, split)``, reading the split's images once however many languages it scores."""
        self._images.clear()
        try:
            return method.evaluate(self, split)
        finally:
            self._images.clear()

    def gallery(self, split: str) -> Gallery:
        """The split's images with what identifies each (every rank's samples, on every rank)."""
        self._images.clear()
        try:
            images = self._image_pass(split)
        finally:
            self._images.clear()
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, images.local)
        samples = sorted((sample for part in parts for sample in part), key=lambda sample: sample[0])
        return Gallery(images.features, images.labels, [s[0] for s in samples], [s[3] for s in samples],
                       [s[2] for s in samples])

    @property
    def sharing(self) -> dict:
        """The keyword arguments of ``dsmoe.metrics``' ``*_from_features`` that share the blocks between ranks."""
        if self.world_size == 1:
            return {}
        return {"part": (self.rank, self.world_size), "reduce": _sum_over_ranks}

    def _lockstep(self, batches: Iterable, dummy) -> Iterator[tuple[object, bool]]:
        """Yield (batch, real) until every rank is done; a finished rank runs ``dummy`` so MoE collectives match.
        ``EvaluationStopped`` on every rank once any rank has a stop request."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            flags = flag_tensor(0 if batch is None else 1, self.stop_request())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            more, request = flags.tolist()
            if request:
                self.engine.train()
                raise EvaluationStopped(request)
            if more == 0:
                return
            yield (batch, True) if batch is not None else (dummy, False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def features(self, split: str, language: str, encode: Callable[[list[str]], dict],
                 text_forward: Callable[[dict], torch.Tensor]) -> SplitFeatures:
        """The split's image features and its ``language`` captions' features.

        ``encode`` turns captions into a batch of tensors and ``text_forward`` that batch into features; each
        caption's label is its image's (person id, or image id for image-text data).
        """
        images = self._image_pass(split)
        captions = [(text, label, index) for index, label, by_language, _ in images.local
                    for text in by_language.get(language, [])]
        size = self.cfg.train.eval_batch_size
        chunks = (captions[i:i + size] for i in range(0, len(captions), size))
        self.engine.eval()
        texts, width = [], images.features.shape[1]
        for chunk, real in self._lockstep(chunks, [("", 0, 0)]):
            feats = text_forward(self._to_device(encode([c[0] for c in chunk]))).float()
            if real:
                texts.append(feats)
        self.engine.train()
        local = torch.cat(texts) if texts else torch.zeros(0, width, device=self.device)
        labels = torch.tensor([c[1] for c in captions], dtype=torch.long, device=self.device)
        order = torch.tensor([c[2] for c in captions], dtype=torch.long, device=self.device)
        text_features, text_labels = _in_split_order(local, labels, order)
        return SplitFeatures(images.features, images.labels, self._normalised(text_features), text_labels)

    @torch.no_grad()
    def _image_pass(self, split: str) -> _ImagePass:
        if split in self._images:
            return self._images[split]
        cfg = self.cfg
        self.engine.eval()
        h, w = cfg.model.image_size
        loader = eval_loader(cfg.data.eval_shards or cfg.data.shards, split, cfg.model.image_size, self.rank,
                             self.world_size, cfg.train.eval_batch_size, cfg.data.workers, cfg.data.remote,
                             cfg.data.checksums, cfg.data.image_fit)
        dummy = {"image": torch.zeros(1, 3, h, w, dtype=torch.uint8)}
        features, local, faults, width = [], [], [], 0
        phase = Phase(f"evaluation of '{split}': image features (rank 0's share)", unit="images",
                      enabled=self.rank == 0)
        for batch, real in self._lockstep(loader, dummy):
            if real:
                phase.advance(len(batch["index"]))
                faults += batch["faults"]
                if batch["image"] is None:  # nothing usable in this batch: the dummy keeps MoE collectives matched
                    batch, real = dummy, False
            pixels = normalize(batch["image"], device=self.device, dtype=self.dtype)
            feats = self.model.encode_image(pixels).float()
            width = feats.shape[1]
            if real:
                features.append(feats)
                local += zip(batch["index"].tolist(), batch["pid"].tolist(), batch["captions"], batch["key"])
        self.engine.train()
        phase.close()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, faults)
        self._check_missing(split, [f for rank_faults in gathered for f in rank_faults])
        own = torch.cat(features) if features else torch.zeros(0, width, device=self.device)
        labels = torch.tensor([s[1] for s in local], dtype=torch.long, device=self.device)
        order = torch.tensor([s[0] for s in local], dtype=torch.long, device=self.device)
        image_features, image_labels = _in_split_order(own, labels, order)
        if image_features.shape[0] == 0:
            raise RunError(f"the evaluation split '{split}' has no usable image")
        self._images[split] = _ImagePass(self._normalised(image_features), image_labels, local)
        return self._images[split]

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1).to(self.dtype)

    def _check_missing(self, split: str, faults: list[SampleFault]) -> None:
        """Remember the split's unusable samples; past the run's limit, stop (on every rank alike)."""
        data = self.cfg.data
        self.missing[split] = {f.identity: f for f in faults}
        samples = read_split(data.eval_shards or data.shards, split, reads=data.remote).samples
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


def _sum_over_ranks(sums: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local`` (rank by rank), on every rank; ranks may hold different numbers of rows."""
    world = dist.get_world_size()
    if world == 1:
        return local
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _in_split_order(features: torch.Tensor, labels: torch.Tensor,
                    order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, labels) sorted by split index (stable: a sample's captions keep their order)."""
    features, labels, order = _gather_rows(features), _gather_rows(labels), _gather_rows(order)
    permutation = torch.sort(order, stable=True).indices
    return features[permutation], labels[permutation]


def format_results(results: dict, keys: tuple[str, ...], run_dir: str | Path) -> str:
    """A finished run's closing table: the test scores before and after training, the model selection, what was
    trained and where to look next."""
    rows = [(results.get("start_label", "untrained"), results.get("zero_shot")), ("trained", results["test"])]
    width = max(8, *(len(k) + 2 for k in keys))
    lines = [f"{'test split':<12}" + "".join(f"{k:>{width}}" for k in keys)]
    for name, metrics in rows:
        if metrics:
            lines.append(f"{name:<12}" + "".join(f"{metrics[k]:{width}.2f}" for k in keys))
    lines.append(f"model selection: {results['model_selection']}")
    lines.append(run_summary(results, run_dir))
    return "\n".join(lines)


def run_summary(results: dict, run_dir: str | Path) -> str:
    """What a run trained (method, experts, ranks, trainable parameters) and the commands that show it further."""
    cfg, run = results["config"], shlex.quote(str(run_dir))
    adapter = cfg["adapter"]
    trained = results.get("trained") or (f"{adapter['num_experts']} experts a layer (top-{adapter['top_k']}, "
                                         f"{adapter['router']} router)")  # results.json of older versions
    return "\n".join([
        f"trained: {cfg['method']}, {trained} over {results['world_size']} ranks (ep_size {results['ep_size']}), "
        f"{results['trainable_parameters']:,} trainable parameters",
        f"next: python -m dsmoe.report {run}              # losses, scores and routing as pictures",
        f"      python -m dsmoe.retrieve --checkpoint {run}   # ask the trained model for images"])
