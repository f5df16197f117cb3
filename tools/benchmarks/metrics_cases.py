"""dsmoe's retrieval metrics against the field's dense way of computing them, and evaluation at 100k x 100k.

The dense baselines are written here the way the field's evaluation scripts work (their code is not copied):

- person retrieval, as IRRA's ``rank()``: a full descending argsort of the score matrix, the gallery ids gathered
  in that order, cumulative matches for R@K, then per query the INP from its last match (a Python loop over rows)
  and the AP from the cumulative matches divided column by column;
- image-text retrieval, as ALBEF's ``itm_eval``: for every image and every caption a numpy argsort of its row of
  scores and the position of its (best) match.

Scores come from synthetic features with the benchmarks' shapes and a plausible model's quality (identity or
image clusters plus noise), so that ranks and ties behave as in a real evaluation.
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.measure import extra_peak_rss, report, stopwatch

# queries, gallery, identities (person) / captions per image (image-text); noise: how far a sample's features
# stray from its identity's or image's (chosen for R@1 near published results: ~60 ICFG, ~70 CUHK, ~60 COCO t2i)
SIZES = {
    "icfg": {"queries": 19848, "gallery": 19848, "ids": 1000, "noise": 2.8},
    "cuhk": {"queries": 6156, "gallery": 3074, "ids": 1000, "noise": 2.5},
    "coco": {"images": 5000, "captions_per_image": 5, "noise": 2.2},
    "scale": {"queries": 100_000, "gallery": 100_000, "ids": 10_000, "noise": 2.8},
}
QUICK_SIZES = {
    "icfg": {"queries": 1500, "gallery": 1500, "ids": 100, "noise": 2.8},
    "cuhk": {"queries": 600, "gallery": 300, "ids": 100, "noise": 2.5},
    "coco": {"images": 400, "captions_per_image": 5, "noise": 2.2},
    "scale": {"queries": 4000, "gallery": 4000, "ids": 400, "noise": 2.8},
}
DIM = 512


def person_features(queries: int, gallery: int, ids: int, noise: float, seed: int = 0):
    """(text features, text ids, image features, image ids): every identity has images and captions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, DIM, generator=g)
    gallery_ids = torch.arange(gallery) % ids
    query_ids = gallery_ids[torch.randint(0, gallery, (queries,), generator=g)]
    images = centres[gallery_ids] + noise * torch.randn(gallery, DIM, generator=g)
    texts = centres[query_ids] + noise * torch.randn(queries, DIM, generator=g)
    return (torch.nn.functional.normalize(texts, dim=1), query_ids,
            torch.nn.functional.normalize(images, dim=1), gallery_ids)


def image_text_features(images: int, captions_per_image: int, noise: float, seed: int = 0):
    """(caption features, caption's image id, image features, image ids): an image and its captions share a
    latent content."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randn(images, DIM, generator=g)
    text_ids = torch.arange(images).repeat_interleave(captions_per_image)
    texts = content[text_ids] + noise * torch.randn(len(text_ids), DIM, generator=g)
    image_features = content + noise * torch.randn(images, DIM, generator=g)
    return (torch.nn.functional.normalize(texts, dim=1), text_ids,
            torch.nn.functional.normalize(image_features, dim=1), torch.arange(images))


# ---------------------------------------------------------------------------------------------------------------
# the dense baselines


def dense_person_metrics(similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> dict:
    order = torch.argsort(similarity, dim=1, descending=True)
    matches = gallery_ids[order].eq(query_ids.view(-1, 1))
    cmc = matches[:, :10].cumsum(1).clamp(max=1).float().mean(0) * 100
    hits_so_far = matches.cumsum(1)
    inp = []
    for row, row_matches in enumerate(matches):
        last = row_matches.nonzero()[-1]
        inp.append(hits_so_far[row][last] / (last + 1.0))
    precision = torch.stack([hits_so_far[:, j] / (j + 1.0) for j in range(hits_so_far.shape[1])], 1) * matches
    ap = precision.sum(1) / matches.sum(1)
    return {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]), "mAP": float(ap.mean() * 100),
            "mINP": float(torch.cat(inp).mean() * 100)}


def dense_recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, text_ids: np.ndarray) -> dict:
    captions_of = [[] for _ in range(scores_i2t.shape[0])]
    for caption, image in enumerate(text_ids):
        captions_of[image].append(caption)
    i2t = np.zeros(scores_i2t.shape[0])
    for image, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        i2t[image] = min(np.where(order == caption)[0][0] for caption in captions_of[image])
    t2i = np.zeros(scores_t2i.shape[0])
    for caption, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        t2i[caption] = np.where(order == text_ids[caption])[0][0]
    out = {f"i2t_R{k}": 100.0 * float((i2t < k).mean()) for k in (1, 5, 10)}
    out.update({f"t2i_R{k}": 100.0 * float((t2i < k).mean()) for k in (1, 5, 10)})
    out["AR"] = sum(out.values()) / 6
    return out


# ---------------------------------------------------------------------------------------------------------------
# cases (each runs in its own process)


def rank_case(variant: str, options: dict) -> None:
    """Person retrieval from a score matrix: ``dense`` (IRRA's way) or ``dsmoe`` (``rank_metrics``)."""
    from dsmoe.metrics import rank_metrics

    texts, text_ids, images, image_ids = person_features(**options["size"])
    similarity = texts @ images.t()
    out: dict = {}
    with extra_peak_rss(out), stopwatch(out):
        if variant == "dense":
            metrics = dense_person_metrics(similarity, text_ids, image_ids)
        else:
            metrics = rank_metrics(similarity, text_ids, image_ids)
    report({**out, "metrics": metrics})


def recall_case(variant: str, options: dict) -> None:
    """Image-text retrieval from score matrices: ``dense`` (ALBEF's way) or ``dsmoe`` (``recall_metrics``)."""
    from dsmoe.metrics import recall_metrics

    texts, text_ids, images, image_ids = image_text_features(**options["size"])
    scores_t2i = texts @ images.t()
    scores_i2t = images @ texts.t()
    out: dict = {}
    with extra_peak_rss(out), stopwatch(out):
        if variant == "dense":
            metrics = dense_recall_metrics(scores_i2t.numpy(), scores_t2i.numpy(), text_ids.numpy())
        else:
            metrics = recall_metrics(scores_t2i, text_ids, image_ids)
    report({**out, "metrics": metrics})


def scale_case(variant: str, options: dict) -> None:
    """Person-retrieval metrics of Q x G straight from features (the evaluation's path), in blocks."""
    from dsmoe.metrics import rank_metrics_from_features

    texts, text_ids, images, image_ids = person_features(**options["size"])
    out: dict = {}
    with extra_peak_rss(out), stopwatch(out):
        metrics = rank_metrics_from_features(texts, text_ids, images, image_ids)
    report({**out, "metrics": metrics})


def agree(a: dict, b: dict, tolerance: float = 1e-3) -> bool:
    """The same metrics (in percent) from two implementations."""
    return set(a) <= set(b) and all(abs(a[k] - b[k]) <= tolerance for k in a)
