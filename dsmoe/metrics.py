"""Retrieval metrics, computed block by block from a score matrix or straight from features, by counting.

Two protocols (the README's "Evaluation protocol"):

- :func:`rank_metrics`: text-to-image person retrieval (IRRA protocol): R@1/5/10, mAP and mINP, where the
  positives of a caption are all gallery images of the same person id.
- :func:`recall_metrics`: image-text retrieval with several captions per image: R@1/5/10 in both directions
  and their mean, AR.

Ranks follow a stable descending sort (among equal scores the gallery item with the lower index ranks first), but
nothing is sorted: an item's 0-based rank is the number of items scoring higher plus the number scoring the same
with a lower index. For person retrieval the ranks of every positive come from one ``searchsorted`` of the block
against the query's sorted positive scores and a histogram, which gives AP and INP as well.

Only a block of rows (queries) is ever held: ``chunk_size`` rows, fewer for a wide gallery. The ``*_from_features``
variants compute each block as ``queries[i:j] @ gallery.T`` (on the features' device, in their dtype), rank in
float32 or wider, and can take every ``world``-th block (``part=(rank, world)``) with the partial sums added up by
``reduce`` (an all-reduce), so that ranks share the work. All values are returned in percent as Python floats.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["rank_metrics", "rank_metrics_from_features", "recall_metrics", "recall_metrics_from_features"]

_KS: tuple[int, ...] = (1, 5, 10)
_BLOCK_ELEMENTS = 8 * 2 ** 20  # scores per block at the most (the block and its int32 helpers: ~100 MB)

Blocks = Callable[[int, int], torch.Tensor]  # (start, stop) -> scores of rows start..stop-1, [stop - start, cols]
Reduce = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# input checks (once per call, not per block)


def _check_scores(similarity: torch.Tensor, name: str = "similarity") -> None:
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
        raise ValueError(f"{name} has {ids.shape[0]} entries but there are {length} {what}")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must hold integer ids, got dtype {ids.dtype}")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_features(queries: torch.Tensor, gallery: torch.Tensor, names: tuple[str, str]) -> None:
    for name, t in zip(names, (queries, gallery)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0 or not t.is_floating_point():
            raise ValueError(f"{name} must be a non-empty 2-D float tensor [items, dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN; rankings would be undefined")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} have different widths: {queries.shape[1]} and {gallery.shape[1]}")


def _check_person_ids(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> None:
    has_positive = torch.isin(query_pids, gallery_pids)
    if not bool(has_positive.all()):
        missing = torch.nonzero(~has_positive).flatten()
        raise ValueError(
            f"{missing.numel()} of {len(query_pids)} queries have no positive in the gallery "
            f"(first query indices: {missing[:5].tolist()}, pids: {query_pids[missing[:5]].tolist()}); "
            "the protocol requires every query's person id to appear in the gallery")


def _check_image_ids(text_image_ids: torch.Tensor, image_ids: torch.Tensor) -> None:
    if torch.unique(image_ids).numel() != len(image_ids):
        raise ValueError("image_ids must be unique (one column per image)")
    known = torch.isin(text_image_ids, image_ids)
    if not bool(known.all()):
        bad = torch.nonzero(~known).flatten()
        raise ValueError(f"{bad.numel()} captions refer to image ids not in image_ids "
                         f"(first caption indices: {bad[:5].tolist()}, ids: {text_image_ids[bad[:5]].tolist()})")


# ---------------------------------------------------------------------------------------------------------------
# the counting kernels: one block of query rows against the whole gallery


def _checked_ids(row_ids: torch.Tensor, col_ids: torch.Tensor, shape: tuple[int, int], names: tuple[str, str],
                 what: tuple[str, str], chunk_size: int, device: torch.device,
                 check_pair: Callable[[torch.Tensor, torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids of the rows and columns, checked against ``shape`` and each other (``check_pair``), on ``device``."""
    _check_ids(row_ids, shape[0], names[0], what[0])
    _check_ids(col_ids, shape[1], names[1], what[1])
    _check_chunk_size(chunk_size)
    row_ids, col_ids = row_ids.to(device), col_ids.to(device)
    check_pair(row_ids, col_ids)
    return row_ids, col_ids


def _widened(scores: torch.Tensor) -> torch.Tensor:
    """Scores to rank: float32 at least (bf16 and fp16 blocks are widened)."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def _hits(rank0: torch.Tensor) -> torch.Tensor:
    """[len(_KS)] rows whose 0-based rank is below K, for each K."""
    return torch.stack([(rank0 < k).sum() for k in _KS]).to(torch.float64)


def _person_block(scores: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> torch.Tensor:
    """[hits@1, hits@5, hits@10, sum of AP, sum of INP] of one block of queries (every query has a positive)."""
    scores = _widened(scores).contiguous()
    rows, cols = scores.shape
    device = scores.device
    positive = gallery_pids[None, :] == query_pids[:, None]  # [c, G]
    count = positive.sum(dim=1)  # >= 1
    width = int(count.max())
    row, col = positive.nonzero(as_tuple=True)  # row-major: each row's positives in column order
    slot = torch.arange(len(row), device=device) - (torch.cumsum(count, 0) - count)[row]
    pos_col = torch.full((rows, width), cols, dtype=torch.long, device=device)
    pos_col[row, slot] = col
    pos_score = torch.full((rows, width), float("inf"), dtype=scores.dtype, device=device)
    pos_score[row, slot] = scores[row, col]

    # Items scoring higher than each positive: a histogram of where every item falls among the sorted positives
    # (a column of +inf after them, so that every item has a place). Items below the lowest positive all fall in
    # the first place; for a useful model they are nearly all of them, so only the others are placed one by one.
    sorted_score, perm = torch.cat([pos_score, pos_score.new_full((rows, 1), float("inf"))], dim=1).sort(dim=1)
    histogram = torch.zeros(rows, width + 1, dtype=torch.int64, device=device)
    contender = scores >= sorted_score[:, :1]
    contenders = contender.sum(dim=1)
    if int(contenders.sum()) <= rows * cols // 32:
        c_row, c_col = contender.nonzero(as_tuple=True)
        c_score = scores[c_row, c_col]
        place = torch.searchsorted(sorted_score[c_row], c_score[:, None]).squeeze(1)
        histogram.index_put_((c_row, place), torch.ones_like(place), accumulate=True)
        histogram[:, 0] += cols - contenders
        tied = sorted_score[c_row, place] == c_score
        tie_row, tie_col = c_row[tied], c_col[tied]
    else:
        place = torch.searchsorted(sorted_score, scores)  # [c, G]
        histogram.scatter_add_(1, place, torch.ones((1, 1), dtype=torch.int64, device=device).expand(rows, cols))
        tie_row, tie_col = (sorted_score.gather(1, place) == scores).nonzero(as_tuple=True)
    higher = torch.empty(rows, width + 1, dtype=torch.int64, device=device)
    higher.scatter_(1, perm, cols - histogram.cumsum(dim=1))
    higher = higher[:, :width]

    # ... plus items with the same score and a lower index (equal scores: duplicates, quantised scores); an item
    # scores the same as some positive when it equals the lowest positive score not below it
    tie_score = scores[tie_row, tie_col]
    order = torch.argsort(tie_score, stable=True)
    order = order[torch.argsort(tie_row[order], stable=True)]  # by row, then score, then column
    tie_row, tie_col, tie_score = tie_row[order], tie_col[order], tie_score[order]
    new_group = torch.ones(len(order), dtype=torch.bool, device=device)
    new_group[1:] = (tie_row[1:] != tie_row[:-1]) | (tie_score[1:] != tie_score[:-1])
    start = torch.cummax(torch.where(new_group, torch.arange(len(order), device=device), 0), dim=0).values
    before = torch.arange(len(order), device=device) - start  # same-score items with a lower index
    is_positive = positive[tie_row, tie_col]
    p_row, p_col, p_before = tie_row[is_positive], tie_col[is_positive], before[is_positive]
    p_slot = torch.searchsorted(pos_col[p_row], p_col[:, None]).squeeze(1)
    ties = torch.zeros(rows, width, dtype=torch.int64, device=device)
    ties[p_row, p_slot] = p_before

    valid = torch.arange(width, device=device)[None, :] < count[:, None]
    rank1 = torch.where(valid, higher + ties + 1, torch.iinfo(torch.int64).max).sort(dim=1).values  # 1-based
    nth = torch.arange(1, width + 1, device=device, dtype=torch.float64)[None, :]
    precision = torch.where(valid, nth / rank1.to(torch.float64), 0.0)
    ap = precision.sum(dim=1) / count
    inp = count / rank1.gather(1, (count - 1)[:, None]).squeeze(1).to(torch.float64)
    return torch.cat([_hits(rank1[:, 0] - 1), ap.sum()[None], inp.sum()[None]])


def _rank_of_best(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best-ranked positive; ``positives`` [rows, P] holds the columns of each row's
    positives (-1: none; a row without any gets a rank past every K). ``scores`` may be a strided view."""
    scores = _widened(scores)
    valid = positives >= 0
    positive_scores = torch.where(valid, scores.gather(1, positives.clamp(min=0)), float("-inf"))
    best = positive_scores.max(dim=1, keepdim=True).values
    first = torch.where(valid & (positive_scores == best), positives, scores.shape[1]).min(dim=1, keepdim=True).values
    at_or_above = (scores >= best).sum(dim=1, dtype=torch.int32)
    same = (scores == best).sum(dim=1, dtype=torch.int32)  # the best positive itself, and any exact tie
    rank0 = (at_or_above - same).long()
    tied = (same > 1).nonzero().flatten()  # rare: count the tied items with a lower index
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    rank0[tied] += ((scores[tied] == best[tied]) & (columns < first[tied])).sum(dim=1)
    return torch.where(valid.any(dim=1), rank0, torch.iinfo(torch.int64).max)


# ---------------------------------------------------------------------------------------------------------------
# driving the kernels over blocks


def _rows_per_block(cols: int, chunk_size: int) -> int:
    return max(1, min(chunk_size, _BLOCK_ELEMENTS // cols))


def _sum_blocks(num_rows: int, cols: int, chunk_size: int, part: tuple[int, int], width: int,
                kernel: Callable[[int, int], torch.Tensor], device: torch.device) -> torch.Tensor:
    step = _rows_per_block(cols, chunk_size)
    rank, world = part
    total = torch.zeros(width, dtype=torch.float64, device=device)
    for index, start in enumerate(range(0, num_rows, step)):
        if index % world == rank:
            total += kernel(start, min(start + step, num_rows))
    return total


def _person_sums(blocks: Blocks, query_pids: torch.Tensor, gallery_pids: torch.Tensor, chunk_size: int,
                 part: tuple[int, int], reduce: Reduce | None, device: torch.device) -> dict[str, float]:
    sums = _sum_blocks(len(query_pids), len(gallery_pids), chunk_size, part, len(_KS) + 2,
                       lambda s, e: _person_block(blocks(s, e), query_pids[s:e], gallery_pids), device)
    if reduce is not None:
        sums = reduce(sums)
    scale = 100.0 / len(query_pids)
    result = {f"R{k}": float(sums[i]) * scale for i, k in enumerate(_KS)}
    result["mAP"] = float(sums[len(_KS)]) * scale
    result["mINP"] = float(sums[len(_KS) + 1]) * scale
    return result


def _positives_of_each(text_image_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, 1] the column of each caption's image, [I, P] the captions of each image, -1 padded)."""
    order = torch.argsort(image_ids)
    text_cols = order[torch.searchsorted(image_ids[order], text_image_ids)]
    by_image = torch.argsort(text_cols, stable=True)
    counts = torch.bincount(text_cols, minlength=len(image_ids))
    first_of_image = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(text_cols), device=text_cols.device) - first_of_image[text_cols[by_image]]
    image_texts = torch.full((len(image_ids), max(1, int(counts.max()))), -1, dtype=torch.long,
                             device=text_cols.device)
    image_texts[text_cols[by_image], slot] = by_image
    return text_cols[:, None], image_texts


def _recall_sums(t2i_blocks: Blocks, i2t_blocks: Blocks, text_image_ids: torch.Tensor, image_ids: torch.Tensor,
                 chunk_size: int, part: tuple[int, int], reduce: Reduce | None,
                 device: torch.device) -> dict[str, float]:
    num_texts, num_images = len(text_image_ids), len(image_ids)
    text_cols, image_texts = _positives_of_each(text_image_ids, image_ids)
    sums = torch.cat([
        _sum_blocks(num_texts, num_images, chunk_size, part, len(_KS),
                    lambda s, e: _hits(_rank_of_best(t2i_blocks(s, e), text_cols[s:e])), device),
        _sum_blocks(num_images, num_texts, chunk_size, part, len(_KS),
                    lambda s, e: _hits(_rank_of_best(i2t_blocks(s, e), image_texts[s:e])), device)])
    if reduce is not None:
        sums = reduce(sums)
    captioned = int((image_texts[:, 0] >= 0).sum())  # images without a caption are only distractors
    result = {f"t2i_R{k}": float(sums[i]) * 100.0 / num_texts for i, k in enumerate(_KS)}
    result.update({f"i2t_R{k}": float(sums[len(_KS) + i]) * 100.0 / captioned for i, k in enumerate(_KS)})
    result["AR"] = sum(result.values()) / 6.0
    return result


def _feature_blocks(queries: torch.Tensor, gallery: torch.Tensor) -> Blocks:
    gallery_t = gallery.t()
    return lambda start, stop: queries[start:stop] @ gallery_t


# ---------------------------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def rank_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, *,
                 chunk_size: int = 1024) -> dict[str, float]:
    """Text-to-image person-retrieval metrics (IRRA protocol), in percent.

    Args:
        similarity: [Q, G] scores, queries (captions) x gallery (images); higher is more similar.
        query_pids: [Q] person id of each query.
        gallery_pids: [G] person id of each gallery item.
        chunk_size: queries ranked at a time (fewer for a wide gallery).

    Returns:
        ``{"R1", "R5", "R10", "mAP", "mINP"}``. R@K: share of queries with a positive in the top K.
        AP: mean over a query's positives of the precision at that positive's rank. INP: number of positives
        divided by the 1-based rank of the last positive. mAP and mINP average over queries.

    Raises:
        ValueError: on malformed inputs or if some query has no positive in the gallery.
    """
    _check_scores(similarity)
    query_pids, gallery_pids = _checked_ids(query_pids, gallery_pids, tuple(similarity.shape),
                                            ("query_pids", "gallery_pids"),
                                            ("rows (queries)", "columns (gallery items)"), chunk_size,
                                            similarity.device, _check_person_ids)
    return _person_sums(lambda s, e: similarity[s:e], query_pids, gallery_pids, chunk_size, (0, 1), None,
                        similarity.device)


@torch.no_grad()
def rank_metrics_from_features(queries: torch.Tensor, query_pids: torch.Tensor, gallery: torch.Tensor,
                               gallery_pids: torch.Tensor, *, chunk_size: int = 1024, part: tuple[int, int] = (0, 1),
                               reduce: Reduce | None = None) -> dict[str, float]:
    """:func:`rank_metrics` of ``queries @ gallery.T`` (normalise the features first for cosine similarity),
    computed one block of queries at a time; ``part``/``reduce`` share the blocks between ranks."""
    _check_features(queries, gallery, ("queries", "gallery"))
    query_pids, gallery_pids = _checked_ids(query_pids, gallery_pids, (len(queries), len(gallery)),
                                            ("query_pids", "gallery_pids"), ("queries", "gallery items"), chunk_size,
                                            queries.device, _check_person_ids)
    return _person_sums(_feature_blocks(queries, gallery), query_pids, gallery_pids, chunk_size, part, reduce,
                        queries.device)


@torch.no_grad()
def recall_metrics(similarity: torch.Tensor, text_image_ids: torch.Tensor, image_ids: torch.Tensor, *,
                   chunk_size: int = 1024) -> dict[str, float]:
    """Image-text retrieval recalls in both directions, in percent.

    Args:
        similarity: [T, I] scores, texts x images.
        text_image_ids: [T] id of the image each caption describes; every id must be in ``image_ids``.
        image_ids: [I] unique id of each image.
        chunk_size: queries ranked at a time, in either direction.

    Returns:
        ``t2i_R{1,5,10}``: share of captions whose image is in their top K.
        ``i2t_R{1,5,10}``: share of images with at least one caption that have ANY of their captions in the
        top K; images without a caption take part only as distractors of text-to-image retrieval.
        ``AR``: mean of the six recalls.

    Raises:
        ValueError: on malformed inputs, duplicate image ids, or a caption whose image id is unknown.
    """
    _check_scores(similarity)
    text_image_ids, image_ids = _checked_ids(text_image_ids, image_ids, tuple(similarity.shape),
                                             ("text_image_ids", "image_ids"), ("rows (texts)", "columns (images)"),
                                             chunk_size, similarity.device, _check_image_ids)
    return _recall_sums(lambda s, e: similarity[s:e], lambda s, e: similarity[:, s:e].t(), text_image_ids,
                        image_ids, chunk_size, (0, 1), None, similarity.device)


@torch.no_grad()
def recall_metrics_from_features(texts: torch.Tensor, text_image_ids: torch.Tensor, images: torch.Tensor,
                                 image_ids: torch.Tensor, *, chunk_size: int = 1024, part: tuple[int, int] = (0, 1),
                                 reduce: Reduce | None = None) -> dict[str, float]:
    """:func:`recall_metrics` of ``texts @ images.T``, one block at a time in each direction; ``part``/``reduce``
    share the blocks between ranks."""
    _check_features(texts, images, ("texts", "images"))
    text_image_ids, image_ids = _checked_ids(text_image_ids, image_ids, (len(texts), len(images)),
                                             ("text_image_ids", "image_ids"), ("texts", "images"), chunk_size,
                                             texts.device, _check_image_ids)
    return _recall_sums(_feature_blocks(texts, images), _feature_blocks(images, texts), text_image_ids, image_ids,
                        chunk_size, part, reduce, texts.device)
