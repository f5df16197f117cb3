"""Ask a trained model which images match a text: ``python -m dsmoe.retrieve --checkpoint runs/x --query "..."``.

The split's images (``--split``, default the test split) are encoded once and kept beside the run
(``<run>/retrieval/<tag>/<split>.gallery.pt``, or ``<adapters>.retrieval/`` next to an exported ``.safetensors``),
then reused while the checkpoint and the shards are unchanged. Queries come from ``--query`` (repeatable), a file
(``--queries FILE``, one per line; ``-`` for stdin), the split's own captions (``--split-captions N``), or else an
interactive prompt. Each answer lists the top-k images with their score, shard key and label; a query that is one
of the split's captions knows its true images, which are marked. An HTML page of every answer, with the images,
is written (``--html``; default ``results.html`` beside the gallery). DASD runs take queries in any language they
were trained on (``--language``). Runs in one process.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from dsmoe.checkpoint.folder import check_checkpoint, is_portable, run_config_for
from dsmoe.cli import RUN_CONFIG, add_config_arguments
from dsmoe.config import ConfigError, RunConfig, load_config
from dsmoe.launcher import launched_world_size
from dsmoe.data.format import manifest_address, read_split
from dsmoe.data.location import DEFAULT_READS, RemoteReads, read_bytes

if TYPE_CHECKING:
    import torch

    from dsmoe.evaluator import Gallery

GALLERY_VERSION = 1


@dataclass
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity
    index: int  # split index of the image
    key: str
    label: int
    match: bool | None  # None: the query's true images are unknown


@dataclass
class Answer:
    query: str
    hits: list[Hit]
    true_images: int  # images of the query's label(s) in the gallery (0: unknown)
    first_match: int | None  # rank of the best-ranked true image, also beyond the top k


def retrieval_dir(source: str | Path) -> Path:
    """Where the retrieval files of the weights read from ``source`` (a tag directory, or exported adapters) live:
    ``<run>/retrieval/<tag>``, or ``<file>.retrieval`` beside the adapters."""
    path = Path(source)
    if is_portable(path):
        return path.with_name(path.stem + ".retrieval")
    root = path.parent
    run = root.parent if root.name == "checkpoints" else root
    return run / "retrieval" / path.name


def gallery_stamp(cfg: RunConfig, source: str | Path, split: str) -> dict:
    """What a cached gallery was computed from: the weights read from ``source`` (and when they were written),
    the split's manifest, the image size and fit."""
    path = Path(source)
    weights = path if is_portable(path) else path / "COMPLETE"
    shards = cfg.data.eval_shards or cfg.data.shards
    manifest = read_bytes(manifest_address(shards, split), cfg.data.remote)
    return {"version": GALLERY_VERSION, "weights": str(weights.resolve()), "written": weights.stat().st_mtime_ns,
            "manifest": hashlib.sha256(manifest).hexdigest(), "split": split, "image_size": list(cfg.model.image_size),
            "image_fit": cfg.data.image_fit}


def save_gallery(path: Path, gallery: Gallery, stamp: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"stamp": stamp, "features": gallery.features.float().cpu(), "labels": gallery.labels.cpu(),
               "indices": gallery.indices, "keys": gallery.keys, "captions": gallery.captions}
    staging = path.with_name(path.name + ".partial")
    torch.save(payload, staging)
    staging.replace(path)


def load_gallery(path: Path, stamp: dict) -> Gallery | None:
    """The cached gallery at ``path`` if it was computed from ``stamp``'s inputs (else None)."""
    import torch

    from dsmoe.evaluator import Gallery

    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
        return None
    if saved.get("stamp") != stamp:
        return None
    return Gallery(saved["features"], saved["labels"], saved["indices"], saved["keys"], saved["captions"])


class Retriever:
    """Text queries against a gallery, encoded by a method's text path."""

    def __init__(self, method, model, gallery: Gallery, language: str, batch_size: int, device: torch.device,
                 source: str = "", folder: Path = Path(".")):
        languages = method.train_languages()
        if language not in languages:
            raise ConfigError(f"--language {language}: this run was trained on {', '.join(languages)}")
        self.encode, self.forward = method.query_encoder(model, language)
        self.model, self.gallery, self.language = model, gallery, language
        self.batch_size, self.device = batch_size, device
        self.source, self.folder = source, folder  # the checkpoint read and where its retrieval files go
        self.truth: dict[str, set[int]] = {}  # a caption of the split -> the labels of its images
        for label, by_language in zip(gallery.labels.tolist(), gallery.captions):
            for caption in by_language.get(language, []):
                self.truth.setdefault(_normal(caption), set()).add(label)

    def text_features(self, queries: list[str]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        parts = []
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(queries), self.batch_size):
                batch = self.encode(queries[start:start + self.batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                parts.append(F.normalize(self.forward(batch).float(), dim=-1))
        return torch.cat(parts)

    def search(self, queries: list[str], k: int) -> list[Answer]:
        gallery = self.gallery
        scores = self.text_features(queries).cpu() @ gallery.features.float().T
        labels = gallery.labels
        answers = []
        for query, row in zip(queries, scores):
            order = row.argsort(descending=True)
            true = self.truth.get(_normal(query))
            is_true = [int(label) in true for label in labels[order].tolist()] if true else []
            hits = [Hit(r + 1, float(row[i]), gallery.indices[i], gallery.keys[i], int(labels[i]),
                        is_true[r] if true else None) for r, i in enumerate(order[:k].tolist())]
            first = is_true.index(True) + 1 if True in is_true else None
            answers.append(Answer(query, hits, sum(is_true), first))
        return answers


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def split_captions(gallery: Gallery, language: str, count: int) -> list[str]:
    """The first ``count`` captions of the split in ``language``, one per image, in split order."""
    captions = [by_language[language][0] for by_language in gallery.captions if by_language.get(language)]
    return captions[:count]


def gallery_images(shard_dir: str, split: str, indices: Iterable[int],
                   reads: RemoteReads = DEFAULT_READS) -> dict[int, bytes]:
    """The JPEG bytes of the split's samples at ``indices`` (a video's first frame), read from their shards."""
    from dsmoe.data.pipeline import sample_content, shard_samples

    info = read_split(shard_dir, split, reads=reads)
    wanted = sorted(set(indices))
    found: dict[int, bytes] = {}
    base = 0
    for shard in info.entries:
        count = shard.samples
        mine = {i - base for i in wanted if base <= i < base + count}
        if mine:
            for position, sample in shard_samples(shard, [], reads=reads):
                if position in mine:
                    _, media = sample_content(sample, need_media=True)
                    found[base + position] = media[0] if isinstance(media, list) else media
        base += count
    return found


def write_page(path: Path, answers: list[Answer], images: dict[int, bytes], title: str) -> None:
    """An HTML page of the answers: each query with its top-k images in order, true matches framed in green."""
    from dsmoe.files import write_atomic

    style = ("body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;text-align:center;"
             "font-size:11px}img{height:128px;border:4px solid #ccc}figure.match img{border-color:#2a2}"
             "figure.miss img{border-color:#c33}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    for number, answer in enumerate(answers, 1):
        known = answer.hits and answer.hits[0].match is not None
        truth = (f"{answer.true_images} true images, the first at rank {answer.first_match}" if known
                 else "true images unknown (not a caption of the split)")
        parts.append(f"<section class='query'><h2>{number}. {html.escape(answer.query)}</h2><p>{truth}</p>")
        for hit in answer.hits:
            kind = "" if hit.match is None else " match" if hit.match else " miss"
            data = base64.b64encode(images[hit.index]).decode("ascii")
            key = html.escape(str(hit.key), quote=True)
            label = html.escape(str(hit.label), quote=True)
            parts.append(f"<figure class='hit{kind}' data-key='{key}' data-rank='{hit.rank}'>"
                         f"<img src='data:image/jpeg;base64,{data}' alt='{key}'><figcaption>#{hit.rank} "
                         f"{hit.score:.3f}<br>{key}<br>label {label}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    write_atomic(path, "\n".join(parts))


def format_answer(answer: Answer) -> str:
    lines = [f"query: {answer.query}"]
    if answer.hits and answer.hits[0].match is not None:
        lines[0] += f"  ({answer.true_images} true images; the first at rank {answer.first_match})"
    for hit in answer.hits:
        mark = {None: "", True: "  match", False: ""}[hit.match]
        lines.append(f"  {hit.rank:>3}  {hit.score:.4f}  {hit.key}  label {hit.label}{mark}")
    return "\n".join(lines)


def _prompted_queries() -> Iterable[str]:
    while True:
        try:
            line = input("query (empty line to stop)> ").strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoints directory, tag directory or exported .safetensors file")
    add_config_arguments(parser, RUN_CONFIG)
    parser.add_argument("--split", default=None, help="the gallery's split (default: data.test_split)")
    parser.add_argument("--language", default=None, help="the queries' language (default: the first trained)")
    parser.add_argument("--top-k", type=int, default=5, help="images per answer (default: 5)")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--queries", default=None, help="a file of queries, one per line ('-': standard input)")
    parser.add_argument("--split-captions", type=int, default=0, metavar="N",
                        help="also ask the first N captions of the split (one per image): true matches known")
    parser.add_argument("--html", default=None, help="the results page (default: results.html beside the gallery)")
    parser.add_argument("--rebuild", action="store_true", help="encode the gallery again even if it is cached")
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise ConfigError("--top-k must be at least 1")
        queries = [query.strip() for query in args.query]
        if not all(queries):
            raise ConfigError("--query: an empty query (give the words to search for)")
        if launched_world_size() != 1:
            raise ConfigError("run retrieval in a single process (python -m dsmoe.retrieve)")
        check_checkpoint(args.checkpoint)
        config = args.config or run_config_for(args.checkpoint)
        if config is None:
            raise ConfigError(f"no config.yaml found for {args.checkpoint}: pass --config")
        cfg = load_config(config, args.set)
        cfg.check_models()
        if args.queries:
            text = sys.stdin.read() if args.queries == "-" else Path(args.queries).read_text(encoding="utf-8")
            queries += [line.strip() for line in text.splitlines() if line.strip()]
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    interactive = not queries and not args.split_captions
    if interactive and not sys.stdin.isatty():
        print("error: no queries: pass --query, --queries FILE or --split-captions N (or run at a terminal)",
              file=sys.stderr)
        return 2
    return _retrieve(cfg, args, queries, interactive)


def load_retriever(cfg: RunConfig, checkpoint: str | Path, split: str, language: str | None = None,
                   rebuild: bool = False) -> Retriever:
    """A checkpoint's model with the gallery of ``split`` (encoded now, or read from its cache), answering queries
    in ``language`` (default: the first the run was trained on). Needs the process group."""
    from dsmoe.engine import build_inference_engine, device_for
    from dsmoe.evaluator import Evaluator

    method, engine, source = build_inference_engine(cfg, checkpoint)
    folder = retrieval_dir(source)  # the weights the engine read: a run's selected tag, or the adapters file
    cache, stamp = folder / f"{split}.gallery.pt", gallery_stamp(cfg, source, split)
    gallery = None if rebuild else load_gallery(cache, stamp)
    if gallery is None:
        gallery = Evaluator(cfg, engine, device_for(0)).gallery(split)
        save_gallery(cache, gallery, stamp)
        print(f"[dsmoe] encoded {len(gallery.keys):,} images of '{split}' with {source}; saved {cache}")
    else:
        print(f"[dsmoe] reusing the {len(gallery.keys):,} encoded images of '{split}' in {cache}")
    return Retriever(method, engine.module, gallery, language or method.train_languages()[0],
                     cfg.train.eval_batch_size, device_for(0), source, folder)


def write_results(retriever: Retriever, cfg: RunConfig, split: str, answers: list[Answer],
                  page: Path | None = None) -> Path:
    """The results page of ``answers`` (default: ``results.html`` beside the gallery); returns its path."""
    page = page or retriever.folder / "results.html"
    images = gallery_images(cfg.data.eval_shards or cfg.data.shards, split,
                            {hit.index for answer in answers for hit in answer.hits}, cfg.data.remote)
    title = f"{retriever.source}: {split} ({len(retriever.gallery.keys):,} images), {retriever.language} queries"
    write_page(page, answers, images, title)
    return page


def _retrieve(cfg: RunConfig, args: argparse.Namespace, queries: list[str], interactive: bool) -> int:
    from dsmoe.distributed import process_group

    split = args.split or cfg.data.test_split
    with process_group(cfg.train):
        try:
            retriever = load_retriever(cfg, args.checkpoint, split, args.language, args.rebuild)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        queries += split_captions(retriever.gallery, retriever.language, args.split_captions)
        answers = []
        for batch in ([q] for q in _prompted_queries()) if interactive else [queries]:
            for answer in retriever.search(batch, args.top_k):
                print(format_answer(answer))
                answers.append(answer)
        if answers:
            page = write_results(retriever, cfg, split, answers, Path(args.html) if args.html else None)
            print(f"[dsmoe] results page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
