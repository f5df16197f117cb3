"""Asking a trained model which images match a text (``dsmoe.retrieve``), in process on a briefly trained demo run:
the rankings agree with the evaluation's metrics, the gallery is cached and reused, and the results page shows the
right images in the right order with the true ones marked."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import replace

import pytest
import torch

from dsmoe.config import ConfigError, load_config
from trainers import make_trainer


@pytest.fixture(scope="module")
def trained_run(demo_assets, tmp_path_factory):
    return tmp_path_factory.mktemp("retrieve") / "run"


def test_rankings_agree_with_the_evaluation_and_the_page_shows_them(demo_assets, dist_env, signals, trained_run,
                                                                     capsys):
    from dsmoe.retrieve import gallery_images, load_retriever, write_results

    results = make_trainer(demo_assets, trained_run, "train.max_steps=2").train()
    cfg = load_config(trained_run / "config.yaml")
    capsys.readouterr()
    retriever = load_retriever(cfg, trained_run, "test")
    cache = trained_run / "retrieval" / "step00000002" / "test.gallery.pt"
    assert "encoded 72 images of 'test'" in capsys.readouterr().out and cache.is_file()
    gallery = retriever.gallery
    assert gallery.keys == [f"test_{i:07d}" for i in range(72)] and gallery.indices == list(range(72))

    # every caption of the split as a query: the share found at rank <= k is the evaluation's R@k
    queries = [caption for by_language in gallery.captions for caption in by_language["en"]]
    answers = retriever.search(queries, k=10)
    assert len(answers) == results["test"]["captions"] == 144
    for k in (1, 5, 10):
        found = 100 * sum(a.first_match is not None and a.first_match <= k for a in answers) / len(answers)
        assert found == pytest.approx(results["test"][f"R{k}"], abs=1e-9), k
    # each answer: the k best cosine similarities, in order, true images (same person) marked
    scores = retriever.text_features(queries[:3]) @ gallery.features.float().T
    for answer, row in zip(answers[:3], scores):
        best = row.topk(10)
        assert [h.index for h in answer.hits] == best.indices.tolist()
        assert [h.score for h in answer.hits] == pytest.approx(best.values.tolist(), abs=1e-6)
        pid = int(gallery.labels[0])  # the first three captions describe the split's first person
        assert [h.match for h in answer.hits] == [h.label == pid for h in answer.hits]
        assert answer.true_images == int((gallery.labels == pid).sum()) == 3

    page = write_results(retriever, cfg, "test", answers[:3])
    assert page == trained_run / "retrieval" / "step00000002" / "results.html"
    text = page.read_text()
    sections = text.split("<section class='query'>")[1:]
    assert len(sections) == 3
    shown = gallery_images(cfg.data.shards, "test", [h.index for h in answers[0].hits])
    for answer, section in zip(answers[:3], sections):
        assert f"<h2>{answers.index(answer) + 1}. {html.escape(answer.query)}</h2>" in section
        figures = re.findall(r"<figure class='hit (match|miss)' data-key='([^']+)' data-rank='(\d+)'>"
                             r"<img src='data:image/jpeg;base64,([^']+)'", section)
        assert [(key, int(rank)) for _, key, rank, _ in figures] == [(h.key, h.rank) for h in answer.hits]
        assert [kind == "match" for kind, *_ in figures] == [h.match for h in answer.hits]
    for (_, _, _, data), hit in zip(re.findall(r"<figure class='hit (match|miss)' data-key='([^']+)' "
                                               r"data-rank='(\d+)'><img src='data:image/jpeg;base64,([^']+)'",
                                               sections[0]), answers[0].hits):
        assert base64.b64decode(data) == shown[hit.index]  # the shard's own JPEG of that sample

    # the cached gallery is reused while the checkpoint and the shards are unchanged
    written = cache.stat().st_mtime_ns
    again = load_retriever(cfg, trained_run, "test")
    assert "reusing the 72 encoded images" in capsys.readouterr().out and cache.stat().st_mtime_ns == written
    torch.testing.assert_close(again.gallery.features, gallery.features.float())
    hits = again.search(queries[:1], k=10)[0].hits
    assert [h.index for h in hits] == [h.index for h in answers[0].hits]
    assert [h.score for h in hits] == pytest.approx([h.score for h in answers[0].hits], abs=1e-6)
    # other pixels (another image fit) are another gallery: encoded again, not taken from the cache
    cropped = replace(cfg, data=replace(cfg.data, image_fit="center_crop"))
    load_retriever(cropped, trained_run, "test")
    assert "encoded 72 images of 'test'" in capsys.readouterr().out


def test_a_query_language_the_run_was_not_trained_on_is_refused(demo_assets, dist_env, signals, trained_run):
    from dsmoe.retrieve import load_retriever

    if not (trained_run / "config.yaml").is_file():
        make_trainer(demo_assets, trained_run, "train.max_steps=2").train()
    with pytest.raises(ConfigError, match="--language de: this run was trained on en"):
        load_retriever(load_config(trained_run / "config.yaml"), trained_run, "test", language="de")


def test_the_command_refuses_a_folder_without_a_checkpoint_before_building_anything(tmp_path, capsys):
    from dsmoe.retrieve import main

    assert main(["--checkpoint", str(tmp_path), "--query", "a man"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_the_results_page_escapes_hostile_keys_labels_and_queries(tmp_path):
    """Keys and captions come from shards: nothing in them becomes markup of the page."""
    from html.parser import HTMLParser

    from dsmoe.retrieve import Answer, Hit, write_page

    hostile = "x'><img src=x onerror=alert(1)><script>alert(2)</script>\"&"
    answers = [Answer(hostile, [Hit(1, 0.5, 0, hostile, 7, True), Hit(2, 0.25, 1, "test_0000001", 8, False)], 1, 1)]
    page = tmp_path / "results.html"
    write_page(page, answers, {0: b"\xff\xd8jpeg0", 1: b"\xff\xd8jpeg1"}, title=hostile)

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.attributes, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.attributes += attrs

        def handle_data(self, data):
            self.text.append(data)

    parsed = Tags()
    parsed.feed(page.read_text())
    assert "script" not in parsed.tags and parsed.tags.count("img") == 2
    assert {name for name, _ in parsed.attributes} == {"charset", "class", "data-key", "data-rank", "src", "alt"}
    assert ("data-key", hostile) in parsed.attributes and ("alt", hostile) in parsed.attributes
    assert sum(hostile in text for text in parsed.text) >= 3  # title, heading and caption: shown as text


def test_an_empty_query_is_refused(tmp_path, capsys):
    from dsmoe.retrieve import main

    assert main(["--checkpoint", str(tmp_path), "--query", "  "]) == 2
    assert "--query: an empty query" in capsys.readouterr().err
