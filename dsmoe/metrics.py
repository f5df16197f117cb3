"""Retrieval metrics, computed over chunks of queries so that the full ranking is never sorted at once.

Two protocols (the README's "Evaluation protocol"):

- :func:`rank_metrics`: text-to-image person retrieval (IRRA protocol): R@1/5/10, mAP and mINP, where the
  positives of a caption are all gallery images of the same person id.
- :func:`recall_metrics`: image-text retrieval with several captions per image: R@1/5/10 in both directions
  and their mean, AR.

Ties are broken by a stable descending sort: among equal scores, the gallery item with the lower index ranks
first. All values are returned in percent as Python floats.
"""

from __future__ import annotations

import torch

__all__ = ["rank_metrics", "recall_metrics"]

_KS: tuple[int, ...] = (1, 5, 10)


def _check_similarity(similarity: torch.Tensor, name: str = "similarity") -> None:
    if not isinstance(similarity, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(similarity).__name__}")
    if similarity.dim() != 2:
        raise ValueError(f"{name} must be 2-D [queries, gallery], got shape {tuple(similarity.shape)}")
    if similarity.shape[0] == 0 or similarity.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(similarity.shape)}")
    if similarity.is_complex() or similarity.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {similarity.dtype}")
    if similarity.is_floating_point() and bool(torch.isnan(similarity).any()):
        raise ValueError(f"{name} contains NaN; rankings would be undefined")


def _check_ids(ids: torch.Tensor, length: int, name: str, what: str) -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.shape[0] != length:
        raise ValueError(f"{name} has {ids.shape[0]} entries but similarity has {length} {what}")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _checked_inputs(similarity: torch.Tensor, row_ids: torch.Tensor, row_name: tuple[str, str],
                    col_ids: torch.Tensor, col_name: tuple[str, str],
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a [rows, cols] score matrix, its row and column ids ((argument, what a row/column is)) and the
    chunk size; return the ids on the matrix's device."""
    _check_similarity(similarity)
    num_rows, num_cols = similarity.shape
    _check_ids(row_ids, num_rows, row_name[0], f"rows ({row_name[1]})")
    _check_ids(col_ids, num_cols, col_name[0], f"columns ({col_name[1]})")
    _check_chunk_size(chunk_size)
    return row_ids.to(similarity.device), col_ids.to(similarity.device)


def _sorted_order(block: torch.Tensor) -> torch.Tensor:
    """Indices of ``block`` [chunk, G] sorted by descending score per row; ties keep index order."""
    return torch.sort(block, dim=1, descending=True, stable=True).indices


def _first_hit_rank(hits: torch.Tensor) -> torch.Tensor:
    """0-based position of the first True per row of ``hits`` [chunk, G]; G where a row has none."""
    num_cols = hits.shape[1]
    positions = torch.arange(num_cols, device=hits.device).expand_as(hits)
    return torch.where(hits, positions, torch.full_like(positions, num_cols)).min(dim=1).values


def _hits_at_k(first: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """[len(_KS)] how many rows (of those ``counted``) have their first hit within the top K, for each K."""
    within = torch.stack([first < k for k in _KS])  # [len(_KS), chunk]
    return (within if counted is None else within & counted).sum(dim=1)


@torch.no_grad()
def rank_metrics(
    similarity: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Text-to-image person-retrieval metrics (IRRA protocol), in percent.

    Args:
        similarity: [Q, G] scores, queries (captions) x gallery (images); higher is more similar.
        query_pids: [Q] person id of each query.
        gallery_pids: [G] person id of each gallery item.
        chunk_size: number of queries ranked at a time (only a [chunk_size, G] block is ever sorted).

    Returns:
        ``{"R1", "R5", "R10", "mAP", "mINP"}``. R@K: share of queries with a positive in the top K.
        AP: mean over a query's positives of the precision at that positive's rank. INP: number of positives
        divided by the 1-based rank of the last positive. mAP and mINP average over queries.

    Raises:
        ValueError: on malformed inputs or if some query has no positive in the gallery.
    """
    query_pids, gallery_pids = _checked_inputs(similarity, query_pids, ("query_pids", "queries"), gallery_pids,
                                               ("gallery_pids", "gallery items"), chunk_size)
    num_queries, num_gallery = similarity.shape
    device = similarity.device

    has_positive = torch.isin(query_pids, gallery_pids)
    if not bool(has_positive.all()):
        missing = torch.nonzero(~has_positive).flatten()
        raise ValueError(
            f"{missing.numel()} of {num_queries} queries have no positive in the gallery "
            f"(first query indices: {missing[:5].tolist()}, pids: {query_pids[missing[:5]].tolist()}); "
            "the protocol requires every query's person id to appear in the gallery"
        )

    hits_at_k = torch.zeros(len(_KS), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    ranks = torch.arange(1, num_gallery + 1, dtype=torch.float64, device=device)  # 1-based

    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        order = _sorted_order(similarity[start:stop])
        matches = gallery_pids[order] == query_pids[start:stop, None]  # [c, G] bool, in rank order

        hits_at_k += _hits_at_k(_first_hit_rank(matches))

        matches_f = matches.to(torch.float64)
        num_pos = matches_f.sum(dim=1)  # >= 1 by the check above
        precision = matches_f.cumsum(dim=1) / ranks
        ap_sum += ((precision * matches_f).sum(dim=1) / num_pos).sum()
        last_rank = (matches_f * ranks).max(dim=1).values  # 1-based rank of the last positive
        inp_sum += (num_pos / last_rank).sum()

    scale = 100.0 / num_queries
    result = {f"R{k}": float(hits_at_k[i]) * scale for i, k in enumerate(_KS)}
    result["mAP"] = float(ap_sum) * scale
    result["mINP"] = float(inp_sum) * scale
    return result


@torch.no_grad()
def recall_metrics(
    similarity: torch.Tensor,
    text_image_ids: torch.Tensor,
    image_ids: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image-text retrieval recalls in both directions, in percent.

    Args:
        similarity: [T, I] scores, texts x images.
        text_image_ids: [T] id of the image each caption describes; every id must be in ``image_ids``.
        image_ids: [I] unique id of each image.
        chunk_size: number of queries ranked at a time, in either direction.

    Returns:
        ``t2i_R{1,5,10}``: share of captions whose image is in their top K.
        ``i2t_R{1,5,10}``: share of images with at least one caption that have ANY of their captions in the
        top K; images without a caption take part only as distractors of text-to-image retrieval.
        ``AR``: mean of the six recalls.

    Raises:
        ValueError: on malformed inputs, duplicate image ids, or a caption whose image id is unknown.
    """
    text_image_ids, image_ids = _checked_inputs(similarity, text_image_ids, ("text_image_ids", "texts"), image_ids,
                                                ("image_ids", "images"), chunk_size)
    num_texts, num_images = similarity.shape
    device = similarity.device

    if torch.unique(image_ids).numel() != num_images:
        raise ValueError("image_ids must be unique (one column per image)")
    known = torch.isin(text_image_ids, image_ids)
    if not bool(known.all()):
        bad = torch.nonzero(~known).flatten()
        raise ValueError(
            f"{bad.numel()} captions refer to image ids not in image_ids "
            f"(first caption indices: {bad[:5].tolist()}, ids: {text_image_ids[bad[:5]].tolist()})"
        )

    # Column index of each caption's image.
    sorted_ids, perm = torch.sort(image_ids)
    target_column = perm[torch.searchsorted(sorted_ids, text_image_ids)]

    t2i_hits = torch.zeros(len(_KS), dtype=torch.int64, device=device)
    for start in range(0, num_texts, chunk_size):
        stop = min(start + chunk_size, num_texts)
        order = _sorted_order(similarity[start:stop])
        t2i_hits += _hits_at_k(_first_hit_rank(order == target_column[start:stop, None]))

    has_caption = torch.isin(image_ids, text_image_ids)
    num_captioned = int(has_caption.sum())  # >= 1 since num_texts >= 1 and every caption's image exists
    i2t_hits = torch.zeros(len(_KS), dtype=torch.int64, device=device)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        order = _sorted_order(similarity[:, start:stop].T)  # [c, T]
        i2t_hits += _hits_at_k(_first_hit_rank(text_image_ids[order] == image_ids[start:stop, None]),
                               has_caption[start:stop])

    result: dict[str, float] = {}
    for i, k in enumerate(_KS):
        result[f"t2i_R{k}"] = float(t2i_hits[i]) * 100.0 / num_texts
    for i, k in enumerate(_KS):
        result[f"i2t_R{k}"] = float(i2t_hits[i]) * 100.0 / num_captioned
    result["AR"] = sum(result.values()) / 6.0
    return result
