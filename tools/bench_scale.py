"""A full-size rehearsal of a benchmark run, on synthetic data in the real CUHK-PEDES layout at its real size:

    python tools/bench_scale.py                  # CUHK-PEDES size (34,053 / 3,078 / 3,075 images at 384x128)
    python tools/bench_scale.py --quick          # CI size: checks that every row runs
    python tools/bench_scale.py --only resume,s3 # some sections (the data and the first run are reused)

Sections, in order (each reuses what the earlier ones left in ``--work-dir``):

- ``convert``: generate the raw dataset (cached), convert it with ``python -m dsmoe.shards``: images/s, peak RSS,
  shard count and sizes;
- ``train``: DM-Adapter on a small CLIP at 384x128, 2 ranks started by the deepspeed launcher, a bounded number of
  steps from the local shards: steps/s, data-wait share, the largest process's peak RSS (a rank or a loader
  worker), which must not grow with the dataset;
- ``resume``: time to the first batch of a stream resumed at 0%, 10% and 90% of an epoch (rank 0 of 2, one
  loader worker), from the cursor a checkpoint saves and, without one, by replaying the epoch's order;
- ``evaluate``: ``python -m dsmoe.evaluate`` on the full test split, and on an ICFG-PEDES-sized test split
  (19,848 images x 19,848 captions, converted from a synthetic ICFG-PEDES layout): time, peak RSS;
- ``s3``: the same training read from a loopback S3-compatible server (moto): throughput against local disk.

Figures are printed as a table and written as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import checkout  # noqa: E402,F401  (dsmoe importable from a checkout)

TOOLS = Path(__file__).resolve().parent

from bench import Table, machine, write_figures  # noqa: E402

SECTIONS = ("convert", "train", "resume", "evaluate", "s3")
IMAGE_SIZE = (384, 128)
# people per split, 3 images each, two captions per image (CUHK-PEDES: 34,054 / 3,078 / 3,074 images); ICFG-PEDES's
# test split: 19,848 images with one caption each
SIZES = {"cuhk": {"train": 11351, "val": 1026, "test": 1025}, "icfg": {"train": 100, "test": 6616}, "steps": 60}
QUICK_SIZES = {"cuhk": {"train": 40, "val": 6, "test": 6}, "icfg": {"train": 4, "test": 10}, "steps": 6}


def child(command: list[str], env: dict | None = None) -> dict:
    """Run ``command``; its wall time, the peak RSS of its largest process (its children included: ``wait4``) and
    its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed (exit {proc.returncode}):\n{output[-4000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "output": output}


def launch_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **(extra or {})}


def prepare_raw(work: Path, sizes: dict) -> tuple[Path, Path, dict]:
    from dsmoe.demo.people import make_synthetic_icfg, make_synthetic_pedes

    start = time.perf_counter()
    cuhk = make_synthetic_pedes(work / "raw-cuhk", num_ids=sizes["cuhk"], images_per_id=3, captions_per_image=2,
                                image_size=IMAGE_SIZE, min_distance=1, progress=True)
    icfg = make_synthetic_icfg(work / "raw-icfg", num_ids=sizes["icfg"], images_per_id=3, image_size=IMAGE_SIZE,
                               min_distance=1, progress=True)
    return cuhk, icfg, {"seconds": time.perf_counter() - start}


def convert(raw: Path, out: Path, dataset: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    workers = max(1, min(8, os.cpu_count() or 1))
    run = child([sys.executable, "-m", "dsmoe.shards", "--dataset", dataset, "--root", str(raw), "--out", str(out),
                 "--workers", str(workers)], env=launch_env())
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("*.manifest.json"))]
    images = sum(m["samples"] for m in manifests)
    sizes = [s["bytes"] for m in manifests for s in m["shards"]]
    return {"images": images, "seconds": run["seconds"], "images_per_s": images / run["seconds"],
            "peak_rss_mib": run["peak_rss_mib"], "shards": len(sizes),
            "shard_mib_mean": sum(sizes) / len(sizes) / 2**20,
            "shard_mib_max": max(sizes) / 2**20, "total_gib": sum(sizes) / 2**30, "workers": workers}


def scale_clip(work: Path, raw: Path) -> Path:
    """The demo's small CLIP (random weights, speed does not depend on them) with a tokenizer of the captions."""
    from dsmoe.demo.models import build_tiny_clip, train_tokenizer

    out = work / "small-clip"
    if not (out / "config.json").is_file():
        captions = [c for record in json.loads((raw / "reid_raw.json").read_text())[:5000] for c in record["captions"]]
        build_tiny_clip(out, train_tokenizer(captions, out), pretrain=False)
    return out


def train(work: Path, shards: str, clip: Path, steps: int, run: Path, env: dict | None = None) -> dict:
    from dsmoe.launcher import free_port

    shutil.rmtree(run, ignore_errors=True)
    sets = {"demo": "false", "model.clip": str(clip), "data.shards": shards, "data.eval_shards": str(work / "shards"),
            "model.image_size": f"[{IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}]", "train.max_steps": str(steps),
            "train.log_every": "2", "train.eval_zero_shot": "false", "train.output_dir": str(run),
            "data.val_split": "null", "data.workers": "1", "train.batch_size": "32"}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(TOOLS.parent / "dsmoe" / "train.py"), "--ds_config", "zero2.json",
               "--resume", "none", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    result = child(command, env=launch_env(env))
    # rank 0's peak RSS while training (the progress lines), before the final test's evaluation batches
    training_rss = [float(m) for m in re.findall(r"peak RSS ([\d.]+) GiB \(rank 0\)", result["output"])]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "samples_per_s" in r][1:]  # the first interval includes start-up
    test = next(r for r in records if r.get("event") == "test")
    last_step = max(r["time"] for r in records if "samples_per_s" in r)
    samples_per_s = sum(r["samples_per_s"] for r in steps_logged) / len(steps_logged)
    return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"],
            "rank0_training_rss_mib": training_rss[-1] * 1024,
            "samples_per_s": samples_per_s, "steps_per_s": samples_per_s / int(sets["train.batch_size"]),
            "data_wait": sum(r["data_wait"] for r in steps_logged) / len(steps_logged),
            "test_seconds": test["time"] - last_step, "test": {k: test[k] for k in ("R1", "images", "captions")}}


def resume_startup(shards: str, clip: Path, fractions=(0.0, 0.1, 0.9)) -> dict:
    """Seconds to the first batch of rank 0's stream resumed at each fraction of the epoch (one loader worker):
    ``replay`` without a saved cursor (the epoch's order replayed, images sought over), then ``cursor`` from the
    cursor that replayed stream's first batch carries, through JSON as a checkpoint keeps it."""
    from dsmoe.data.pipeline import CaptionPairs, TrainStreamConfig, batches_per_epoch, train_loader
    from dsmoe.data.text import CaptionEncoder, load_tokenizer

    batches = batches_per_epoch(shards, "train", 32)
    cfg = TrainStreamConfig(shard_dir=shards, split="train", image_size=IMAGE_SIZE, micro_batch=16,
                            batches_per_epoch=batches, rank=0, world_size=2, seed=1)
    encoder = CaptionEncoder(load_tokenizer(str(clip)), 32)
    out = {"batches_per_epoch": batches, "replay": {}, "cursor": {}}
    for fraction in fractions:
        start_batch = min(int(batches * fraction), batches - 2)  # the cursor's batch (the next) is in the epoch
        start = time.perf_counter()
        first = next(iter(train_loader(cfg, CaptionPairs(encoder), 0, start_batch, workers=1)))
        out["replay"][f"{fraction:.0%}"] = time.perf_counter() - start
        saved = first["cursor"]
        cursors = {saved.slot: json.loads(json.dumps(saved.state, default=list))}
        start = time.perf_counter()
        next(iter(train_loader(cfg, CaptionPairs(encoder), 0, start_batch + 1, workers=1, cursors=cursors)))
        out["cursor"][f"{fraction:.0%}"] = time.perf_counter() - start
    return out


def evaluate(run: Path, shards: Path, split: str) -> dict:
    result = child([sys.executable, "-m", "dsmoe.evaluate", "--checkpoint", str(run), "--set",
                    f"data.eval_shards={shards}", "--split", split], env=launch_env())
    metrics = json.loads(result["output"][result["output"].index("{"):])
    return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"], "images": metrics["images"],
            "captions": metrics["captions"], "R1": metrics["R1"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized data")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma separated: {SECTIONS}")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsmoe-bench-scale"))
    parser.add_argument("--json", type=Path, default=None, help="where to write the figures (default: print)")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    if set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    sizes = QUICK_SIZES if args.quick else SIZES
    work = args.work_dir / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine": machine(), "quick": args.quick, "sizes": sizes}
    print(f"machine: {figures['machine']['cpu']}, {figures['machine']['cores']} cores, load "
          f"{figures['machine']['load_1min_at_start']}" + (" (quick: CI-sized data)" if args.quick else ""))
    table = Table()
    print(f"{'figure':<58} {'value':>30} {'target':>12} {'met':>4}")
    raw, icfg_raw, made = prepare_raw(work, sizes)
    figures["generate"] = made
    shards, icfg = work / "shards", work / "shards-icfg"
    if "convert" in sections or not (shards / "train.manifest.json").is_file():
        c = figures["convert"] = convert(raw, shards, "cuhk-pedes")
        convert(icfg_raw, icfg, "icfg-pedes")
        table.add(f"convert {c['images']:,} images ({c['workers']} workers)",
                  f"{c['images_per_s']:.0f} images/s, {c['peak_rss_mib']:.0f} MiB")
        table.add("  shards", f"{c['shards']} x {c['shard_mib_mean']:.0f} MiB (max {c['shard_mib_max']:.0f}), "
                  f"{c['total_gib']:.2f} GiB")
    clip = scale_clip(work, raw)
    run = work / "run"
    if "train" in sections or not (run / "results.json").is_file():
        t = figures["train"] = train(work, str(shards), clip, sizes["steps"], run)
        table.add(f"train {sizes['steps']} steps, 2 ranks, batch 32, local shards",
                  f"{t['steps_per_s']:.2f} steps/s, data wait {t['data_wait']:.0%}")
        table.add("  peak RSS: rank 0 while training / largest process overall",
                  f"{t['rank0_training_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} MiB")
    if "resume" in sections:
        r = figures["resume"] = resume_startup(str(shards), clip)
        c, p = r["cursor"], r["replay"]
        table.add(f"resume start-up from the saved cursor at 0% / 10% / 90% of {r['batches_per_epoch']:,} batches",
                  f"{c['0%']:.2f} / {c['10%']:.2f} / {c['90%']:.2f} s", "90% <= 1.5x10%+0.1s",
                  c["90%"] <= 1.5 * c["10%"] + 0.1)
        table.add("  without a cursor (replaying the epoch's order)",
                  f"{p['0%']:.2f} / {p['10%']:.2f} / {p['90%']:.2f} s")
    if "evaluate" in sections:
        for name, where in (("test", shards), ("icfg", icfg)):
            e = figures[f"evaluate_{name}"] = evaluate(run, where, "test")
            table.add(f"evaluate {e['images']:,} images x {e['captions']:,} captions",
                      f"{e['seconds']:.0f} s, {e['peak_rss_mib']:.0f} MiB")
    if "s3" in sections:
        from benchmarks.servers import s3_server, upload

        with s3_server() as env:
            upload(env, shards, "s3://rehearsal/shards")
            s = figures["s3"] = train(work, "s3://rehearsal/shards", clip, sizes["steps"], work / "run-s3", env)
        local = figures.get("train", {}).get("samples_per_s")
        ratio = f", {s['samples_per_s'] / local:.2f}x local" if local else ""
        table.add("train from a loopback S3 server", f"{s['steps_per_s']:.2f} steps/s{ratio}, "
                  f"data wait {s['data_wait']:.0%}")
    write_figures(figures, table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
