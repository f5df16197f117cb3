"""Tests of dsmoe.metrics against slow, independent brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsmoe import metrics
from dsmoe.metrics import rank_metrics, recall_metrics


# ---------------------------------------------------------------- references (loops, full sorts, numpy)


def _stable_desc_order(row: np.ndarray) -> list[int]:
    # Python's sort is stable: equal scores keep index order.
    return sorted(range(len(row)), key=lambda j: -float(row[j]))


def ref_rank_metrics(sim: np.ndarray, qp: np.ndarray, gp: np.ndarray) -> dict[str, float]:
    r = {1: 0, 5: 0, 10: 0}
    aps, inps = [], []
    for i in range(sim.shape[0]):
        order = _stable_desc_order(sim[i])
        pos_ranks = [rank for rank, j in enumerate(order, start=1) if gp[j] == qp[i]]
        assert pos_ranks
        for k in r:
            if pos_ranks[0] <= k:
                r[k] += 1
        aps.append(sum((n + 1) / rank for n, rank in enumerate(pos_ranks)) / len(pos_ranks))
        inps.append(len(pos_ranks) / pos_ranks[-1])
    q = sim.shape[0]
    return {
        "R1": 100 * r[1] / q,
        "R5": 100 * r[5] / q,
        "R10": 100 * r[10] / q,
        "mAP": 100 * float(np.mean(aps)),
        "mINP": 100 * float(np.mean(inps)),
    }


def ref_recall_metrics(sim: np.ndarray, text_img: np.ndarray, img_ids: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in (1, 5, 10):
        hits = 0
        for t in range(sim.shape[0]):
            top = _stable_desc_order(sim[t])[:k]
            hits += any(img_ids[j] == text_img[t] for j in top)
        out[f"t2i_R{k}"] = 100 * hits / sim.shape[0]
    for k in (1, 5, 10):
        hits, n = 0, 0
        for i in range(sim.shape[1]):
            if not any(text_img == img_ids[i]):
                continue
            n += 1
            top = _stable_desc_order(sim[:, i])[:k]
            hits += any(text_img[t] == img_ids[i] for t in top)
        out[f"i2t_R{k}"] = 100 * hits / n
    out["AR"] = float(np.mean(list(out.values())))
    return out


def _assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


# ---------------------------------------------------------------- rank_metrics


def test_rank_metrics_hand_computed() -> None:
    # query 0 (pid 1): order g0(+) g1 g3 g2(+): positives at ranks 1 and 4 -> AP (1/1 + 2/4)/2 = .75, INP 2/4
    # query 1 (pid 2): order g0 g1(+) ...: positive at rank 2 -> AP 1/2, INP 1/2, R1 miss
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.7, 0.6, 0.3, 0.2]])
    got = rank_metrics(sim, torch.tensor([1, 2]), torch.tensor([1, 2, 1, 3]))
    _assert_close(got, {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 62.5, "mINP": 50.0})


def test_rank_metrics_ties_are_stable() -> None:
    sim = torch.tensor([[0.5, 0.5]])
    neg_first = rank_metrics(sim, torch.tensor([1]), torch.tensor([2, 1]))
    assert neg_first["R1"] == 0.0 and neg_first["mAP"] == 50.0 and neg_first["mINP"] == 50.0
    pos_first = rank_metrics(sim, torch.tensor([1]), torch.tensor([1, 2]))
    assert pos_first["R1"] == 100.0 and pos_first["mAP"] == 100.0


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 31, 1024])
def test_rank_metrics_matches_reference(chunk_size: int, quantised: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q, g = 31, 23
    gallery_pids = torch.randint(0, 6, (g,), generator=gen)  # ~4 positives per query
    query_pids = gallery_pids[torch.randint(0, g, (q,), generator=gen)]
    if quantised:  # many exact ties
        sim = torch.randint(0, 4, (q, g), generator=gen).float()
    else:
        sim = torch.randn(q, g, generator=gen)
    got = rank_metrics(sim, query_pids, gallery_pids, chunk_size=chunk_size)
    want = ref_rank_metrics(sim.numpy(), query_pids.numpy(), gallery_pids.numpy())
    _assert_close(got, want)
    assert 0.0 < want["mAP"] < 100.0 and want["R1"] < want["R10"]  # the case is not degenerate


def test_rank_metrics_small_gallery_and_double() -> None:
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    gp = torch.tensor([0, 1, 1])
    qp = torch.randint(0, 2, (9,), generator=gen)
    got = rank_metrics(sim, qp, gp, chunk_size=4)
    _assert_close(got, ref_rank_metrics(sim.numpy(), qp.numpy(), gp.numpy()))
    assert got["R5"] == got["R10"] == 100.0


def test_rank_metrics_perfect_ranking() -> None:
    pids = torch.tensor([3, 3, 7, 9])
    sim = (pids[:, None] == pids[None, :]).float()
    got = rank_metrics(sim, pids, pids, chunk_size=3)
    assert got == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}


def test_only_blocks_of_queries_are_held_and_nothing_is_sorted_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks: list[tuple[int, ...]] = []
    for name in ("_person_block", "_rank_of_best"):
        real = getattr(metrics, name)

        def spy(scores, *args, real=real):  # type: ignore[no-untyped-def]
            blocks.append(tuple(scores.shape))
            return real(scores, *args)

        monkeypatch.setattr(metrics, name, spy)
    sorts: list[tuple[int, ...]] = []
    real_sort = torch.Tensor.sort

    def sort_spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        sorts.append(tuple(x.shape))
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", sort_spy)
    sim = torch.randn(31, 23)
    rank_metrics(sim, torch.arange(31) % 5, torch.arange(23) % 5, chunk_size=7)
    recall_metrics(sim, torch.arange(31) % 23, torch.arange(23), chunk_size=7)
    assert blocks and all(rows <= 7 for rows, _ in blocks), blocks
    assert all(shape[-1] < 23 for shape in sorts), sorts  # only the few positives of each query are sorted
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 100)  # a wide gallery: fewer rows per block
    blocks.clear()
    rank_metrics(sim, torch.arange(31) % 5, torch.arange(23) % 5, chunk_size=7)
    assert {rows for rows, _ in blocks} <= {4, 3}


@pytest.mark.parametrize("quantised", [False, True])
def test_metrics_from_features_agree_with_the_matrix_and_split_over_ranks(quantised: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    texts, images = torch.randn(40, 8, generator=gen), torch.randn(17, 8, generator=gen)
    if quantised:  # duplicated features: exact ties
        texts, images = texts.round(), images.round()
        images[3] = images[5]
    pids = torch.randint(0, 6, (17,), generator=gen)
    text_pids = pids[torch.randint(0, 17, (40,), generator=gen)]
    whole = rank_metrics(texts @ images.t(), text_pids, pids)
    assert metrics.rank_metrics_from_features(texts, text_pids, images, pids, chunk_size=6) == pytest.approx(whole)
    parts = [torch.zeros(5, dtype=torch.float64)]

    def gather(sums: torch.Tensor) -> torch.Tensor:  # the all-reduce of 3 ranks, each seeing its own blocks
        parts.append(sums)
        return sums

    for rank in range(3):
        metrics.rank_metrics_from_features(texts, text_pids, images, pids, chunk_size=6, part=(rank, 3), reduce=gather)
    total = sum(parts)
    split = {"R1": float(total[0]) * 100 / 40, "mAP": float(total[3]) * 100 / 40}
    assert split == pytest.approx({"R1": whole["R1"], "mAP": whole["mAP"]})
    image_ids = torch.arange(100, 117)
    caption_of = image_ids[torch.randint(0, 16, (40,), generator=gen)]  # image 116 has no caption
    want = recall_metrics(texts @ images.t(), caption_of, image_ids)
    got = metrics.recall_metrics_from_features(texts, caption_of, images, image_ids, chunk_size=5)
    assert got == pytest.approx(want)


def test_rank_metrics_errors() -> None:
    sim = torch.randn(3, 4)
    qp, gp = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="no positive"):
        rank_metrics(sim, torch.tensor([0, 1, 5]), gp)
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(torch.randn(12), qp, gp)
    with pytest.raises(ValueError, match="query_pids"):
        rank_metrics(sim, torch.tensor([0, 1]), gp)
    with pytest.raises(ValueError, match="gallery_pids"):
        rank_metrics(sim, qp, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(sim, qp, gp, chunk_size=0)
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(torch.full((3, 4), float("nan")), qp, gp)
    with pytest.raises(ValueError, match="non-empty"):
        rank_metrics(torch.randn(0, 4), torch.tensor([], dtype=torch.long), gp)


# ---------------------------------------------------------------- recall_metrics


def test_recall_metrics_hand_computed() -> None:
    # images 10, 20, 30 (30 has no caption); captions: 0 -> 10, 1 -> 10, 2 -> 20
    sim = torch.tensor(
        [
            [0.1, 0.2, 0.9],  # caption 0: order 30, 20, 10 -> its image at rank 3
            [0.8, 0.1, 0.0],  # caption 1: image 10 at rank 1
            [0.3, 0.6, 0.1],  # caption 2: image 20 at rank 1
        ]
    )
    got = recall_metrics(sim, torch.tensor([10, 10, 20]), torch.tensor([10, 20, 30]))
    # i2t: image 10 column [0.1, 0.8, 0.3] -> caption 1 first (hit at 1); image 20 column [0.2, 0.1, 0.6]
    # -> caption 2 first (hit at 1); image 30 excluded.
    want = {"t2i_R1": 200 / 3, "t2i_R5": 100.0, "t2i_R10": 100.0, "i2t_R1": 100.0, "i2t_R5": 100.0,
            "i2t_R10": 100.0}
    want["AR"] = sum(want.values()) / 6
    _assert_close(got, want)


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 2048])
def test_recall_metrics_matches_reference(chunk_size: int, quantised: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    num_images = 23
    image_ids = torch.randperm(1000, generator=gen)[:num_images]  # arbitrary, unsorted ids
    captioned = torch.arange(num_images) != 4  # image 4 has no caption
    per_image = [5 if i % 3 else 1 for i in range(num_images)]
    text_image_ids = torch.tensor(
        [int(image_ids[i]) for i in range(num_images) if captioned[i] for _ in range(per_image[i])]
    )
    text_image_ids = text_image_ids[torch.randperm(len(text_image_ids), generator=gen)]
    t = len(text_image_ids)
    signal = (text_image_ids[:, None] == image_ids[None, :]).float()  # so recalls are neither 0 nor 100
    if quantised:  # many exact ties
        sim = torch.randint(0, 3, (t, num_images), generator=gen).float() + signal
    else:
        sim = torch.randn(t, num_images, generator=gen) + 1.5 * signal
    got = recall_metrics(sim, text_image_ids, image_ids, chunk_size=chunk_size)
    want = ref_recall_metrics(sim.numpy(), text_image_ids.numpy(), image_ids.numpy())
    _assert_close(got, want)
    assert 0.0 < want["t2i_R1"] < 100.0 and 0.0 < want["i2t_R1"] < 100.0


def test_recall_metrics_uncaptioned_image_is_only_a_distractor() -> None:
    # image 2 has no caption and would be a miss for i2t if it were counted.
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    got = recall_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert got["i2t_R1"] == 100.0
    # ...but it does compete in t2i: make it the top image for caption 0.
    sim[0, 2] = 1.0
    got = recall_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert got["t2i_R1"] == 50.0 and got["i2t_R1"] == 100.0


def test_recall_metrics_i2t_any_caption() -> None:
    # image 0 has captions 0 and 1; for image 0, caption 1 (0.6) outranks caption 2 of image 1 (0.5).
    sim = torch.tensor([[0.0, 0.0], [0.6, 0.0], [0.5, 1.0]])
    got = recall_metrics(sim, torch.tensor([0, 0, 1]), torch.tensor([0, 1]))
    assert got["i2t_R1"] == 100.0
    assert got["t2i_R1"] == 100.0  # caption 0 ties both images: image 0 comes first (stable sort)
    sim[1, 0] = 0.4
    got = recall_metrics(sim, torch.tensor([0, 0, 1]), torch.tensor([0, 1]))
    assert got["i2t_R1"] == 50.0


def test_recall_metrics_errors() -> None:
    sim = torch.randn(3, 2)
    with pytest.raises(ValueError, match="not in image_ids"):
        recall_metrics(sim, torch.tensor([0, 1, 7]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unique"):
        recall_metrics(sim, torch.tensor([0, 0, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="text_image_ids"):
        recall_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image_ids"):
        recall_metrics(sim, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        recall_metrics(sim, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        recall_metrics(sim, torch.tensor([0, 1, 1]), torch.tensor([0, 1]), chunk_size=-3)
