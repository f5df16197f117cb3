"""Benchmark the shard writer and the training reader on a synthetic dataset (not a test; prints a table).

    python tools/bench_shards.py                      # 3000 images at 384x128, writers with 1 and 2 workers
    python tools/bench_shards.py --images 6000 --workers 1,2,4,8 --profile

1. Generates (once; cached under ``--work-dir``) a synthetic CUHK-PEDES-layout dataset: ``--images`` pictures at
   ``--size`` with two captions each (``dsmoe.demo.people.make_synthetic_pedes``).
2. Measures the machine: the same JPEG decode + encode loop (no Python work to speak of) in 1 process and in W
   processes at once. ``capacity`` = how many single-process speeds W processes reach together; a writer that
   scales perfectly reaches it (on a machine with W free cores it is W).
3. Converts the dataset with ``write_shards`` (best of ``--repeat`` runs) for each worker count in three modes:
   ``pass-through`` (JPEGs copied, checked with a reduced-size decode), ``re-encode`` (``--resize`` at the same
   size: a full decode and a JPEG encode per image) and ``downscale`` (``--resize`` at half size). Reports
   images/s and the speed-up over one worker next to the machine's capacity, and for one worker the ``codec
   share``: the time the same decodes/encodes take alone (bytes in memory) over the conversion's time; the rest
   is file I/O, hashing, tar writing, planning and Python overhead.
4. Reads the re-encoded shards back with the training pipeline (``TrainStream`` via ``train_loader``, augment on)
   with 0 and 2 DataLoader workers: samples/s (images decoded and augmented) and caption pairs/s.
5. With ``--profile``: cProfile of the one-worker conversion, grouped into codec work (JPEG decode/encode,
   resize), file I/O and hashing, tar writing, and the rest (Python overhead), plus the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pstats
import shutil
import sys
import time
from pathlib import Path

import checkout  # noqa: F401  (dsmoe importable from a checkout)

from dsmoe.shards.layouts.person import read_person_layout  # noqa: E402
from dsmoe.shards.writer import write_shards  # noqa: E402
from dsmoe.demo.people import make_synthetic_pedes  # noqa: E402

SPIN = 1500


def _spin(_: int) -> float:
    """Seconds for SPIN JPEG decode + encode round trips of a 384x128 picture (codec work only)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((128, 384)).convert("RGB").save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(SPIN):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.save(io.BytesIO(), format="JPEG", quality=95)
    return time.perf_counter() - start


def machine_capacity(workers: int) -> float:
    """How many single-process speeds ``workers`` codec-bound processes reach together on this machine."""
    one = min(_spin(0) for _ in range(2))
    if workers == 1:
        return 1.0
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_spin, range(workers))  # warm up (imports, scheduling)
        start = time.perf_counter()
        pool.map(_spin, range(workers), 1)
        wall = time.perf_counter() - start
    return workers * one / wall


def codec_floor(records, resize) -> float:
    """Seconds of the codec work alone for these images (bytes already in memory, no hashing, no tar, no plan):
    what a one-worker conversion cannot go below."""
    import io

    from PIL import Image

    from dsmoe.shards.workers import encode_jpeg

    blobs = [Path(r.image_path).read_bytes() for r in records]
    start = time.perf_counter()
    for data in blobs:
        image = Image.open(io.BytesIO(data))
        if resize is None:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        else:
            image.draft(None, (resize[1], resize[0]))
            image.load()
            encode_jpeg(image, resize)
    return time.perf_counter() - start


def _pool_startup(workers: int) -> float:
    """Seconds to start the writer's spawn pool and have every worker import the writer (a fixed cost per run)."""
    from dsmoe.shards.workers import Runner

    start = time.perf_counter()
    with Runner(workers) as runner:
        runner.map(_spin_zero, list(range(workers)))
    return time.perf_counter() - start


def _spin_zero(_: int) -> int:
    import dsmoe.shards.workers  # noqa: F401  (what a writer worker imports)

    return 0


def _parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def _convert(records, out: Path, workers: int, resize) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=1000, workers=workers, resize=resize)
    return time.perf_counter() - start


GROUPS = (
    ("codec: JPEG decode", ("ImagingDecoder",)),
    ("codec: JPEG encode", ("ImagingEncoder",)),
    ("codec: resize/convert", ("'resize' of", "'convert' of", "'copy' of 'ImagingCore'")),
    ("file I/O + sha256", ("BufferedReader", "BufferedWriter", "io.open", "openssl_sha256", "hashlib", "posix.fsync",
                           "'read' of", "'write' of", "posix.stat", "posix.replace", "'seek' of")),
    ("tar headers", ("tarfile.py",)),
)


def profile_summary(records, out: Path, resize) -> list[str]:
    """Where one worker's time goes: grouped totals and the top functions by own time."""
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    profiler.enable()
    write_shards(records, out, dataset="cuhk-pedes", samples_per_shard=1000, workers=1, resize=resize)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    grouped = {name: 0.0 for name, _ in GROUPS}
    grouped["python (everything else)"] = 0.0
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{filename}:{line}({name})" if filename != "~" else name
        rows.append((own, calls, label))
        for group, needles in GROUPS:
            if any(n in label for n in needles):
                grouped[group] += own
                break
        else:
            grouped["python (everything else)"] += own
    lines = [f"  total {total:.2f} s (profiled; cProfile slows Python code, not C code)"]
    lines += [f"  {name:<28} {seconds:6.2f} s  {100 * seconds / total:5.1f} %" for name, seconds in grouped.items()]
    lines.append("  top functions by own time:")
    for own, calls, label in sorted(rows, reverse=True)[:8]:
        short = label if len(label) < 90 else "..." + label[-87:]
        lines.append(f"    {own:6.3f} s {calls:7d} calls  {short}")
    return lines


def read_throughput(shard_dir: Path, size: tuple[int, int], captions: list[str], per_sample: float, workers: int,
                    tokenizer_dir: Path, batch: int = 32, batches: int = 60,
                    torch_threads: int | None = None) -> tuple[float, float]:
    """(samples/s, caption pairs/s) of the training stream over ``batches`` micro-batches; every pair decodes and
    augments its image, a sample has ``per_sample`` captions."""
    import torch

    from dsmoe.data.pipeline import CaptionPairs, TrainStreamConfig, train_loader
    from dsmoe.data.text import CaptionEncoder
    from dsmoe.demo.models import train_tokenizer

    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)

    encoder = CaptionEncoder(train_tokenizer(captions, tokenizer_dir), 64)
    cfg = TrainStreamConfig(shard_dir=str(shard_dir), split="train", image_size=size, micro_batch=batch,
                            batches_per_epoch=batches, rank=0, world_size=1, seed=0, shuffle_buffer=1000,
                            augment=True)
    start = time.perf_counter()
    pairs = sum(len(b["pid"]) for b in train_loader(cfg, CaptionPairs(encoder), 0, 0, workers))
    wall = time.perf_counter() - start
    torch.set_num_threads(threads)
    return pairs / wall / per_sample, pairs / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", default="384x128", help="image size HxW")
    parser.add_argument("--workers", default="1,2", help="writer worker counts, comma separated")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsmoe-bench-shards"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per conversion; the fastest counts (shared "
                                                                "machines are noisy)")
    parser.add_argument("--profile", action="store_true", help="profile the one-worker conversions")
    parser.add_argument("--skip-read", action="store_true", help="do not measure the training reader")
    args = parser.parse_args(argv)
    size = _parse_size(args.size)
    worker_counts = [int(w) for w in args.workers.split(",")]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    ids = max(1, args.images // 3)
    root = make_synthetic_pedes(work / f"raw-{args.images}-{args.size}", num_ids={"train": ids}, images_per_id=3,
                                captions_per_image=2, image_size=size)
    records = read_person_layout("cuhk-pedes", root)
    print(f"dataset: {len(records)} images at {size[0]}x{size[1]} ({root}; generated or found in "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"machine: {multiprocessing.cpu_count()} CPUs reported")
    capacity = {w: max(machine_capacity(w) for _ in range(max(1, args.repeat))) for w in worker_counts}

    modes = [("pass-through", None), ("re-encode", size), ("downscale", (size[0] // 2, size[1] // 2))]
    startup = {w: min(_pool_startup(w) for _ in range(max(1, args.repeat))) for w in worker_counts if w > 1}
    print()
    print(f"{'conversion':<14} {'workers':>7} {'seconds':>8} {'images/s':>9} {'speed-up':>9} {'machine cap.':>13} "
          f"{'codec share':>12}")
    for mode, resize in modes:
        base = None
        floor = min(codec_floor(records, resize) for _ in range(max(1, args.repeat)))
        for workers in worker_counts:
            _convert(records[:200], work / "warm", workers, resize)  # page cache, imports
            seconds = min(_convert(records, work / f"out-{mode}-{workers}", workers, resize)
                          for _ in range(max(1, args.repeat)))
            rate = len(records) / seconds
            base = base or rate
            share = f"{100 * floor / seconds:>11.0f}%" if workers == 1 else f"{'':>12}"
            print(f"{mode:<14} {workers:>7} {seconds:>8.2f} {rate:>9.0f} {rate / base:>8.2f}x "
                  f"{capacity[workers]:>12.2f}x {share}")
    identical = all(
        sorted((p.name, p.read_bytes()) for p in (work / f"out-re-encode-{w}").glob("*.tar"))
        == sorted((p.name, p.read_bytes()) for p in (work / f"out-re-encode-{worker_counts[0]}").glob("*.tar"))
        for w in worker_counts)
    print(f"shards byte-identical across worker counts: {identical}")
    for workers, seconds in startup.items():
        print(f"process pool start-up with {workers} workers (spawn; included above): {seconds:.2f} s")

    if not args.skip_read:
        captions = [c for r in records for c in r.captions]
        print()
        print(f"{'training reader (augment on)':<40} {'samples/s':>10} {'pairs/s':>9}")
        import torch

        default_threads = torch.get_num_threads()
        for workers, threads in ((0, None), (0, 1), (2, None)):
            samples, pairs = read_throughput(work / f"out-re-encode-{worker_counts[0]}", size, captions,
                                             len(captions) / len(records), workers, work / "tokenizer",
                                             torch_threads=threads)
            label = f"DataLoader workers={workers}" + (f", torch threads={threads or default_threads}"
                                                       if workers == 0 else "")
            print(f"{label:<40} {samples:>10.0f} {pairs:>9.0f}")

    if args.profile:
        for mode, resize in modes:
            print()
            print(f"profile: {mode}, 1 worker, {len(records)} images")
            for line in profile_summary(records, work / "profile", resize):
                print(line)
    shutil.rmtree(work / "warm", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
