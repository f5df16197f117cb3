"""Every performance comparison of dsmoe in one command: prints a table of ratios against their targets and
writes the figures as JSON.

    python tools/bench.py                          # everything (on 2 CPU cores the step section alone: 25 min)
    python tools/bench.py --only metrics,reader    # some sections
    python tools/bench.py --quick                  # CI-sized inputs: checks that every row runs, not the targets

Sections (each variant runs in a process of its own; variants are interleaved and repeated, see
``benchmarks/measure.py``; min and median over the repeats, noise = (max - min) / median):

- ``metrics``: ``rank_metrics`` against a dense IRRA-style evaluation at ICFG-PEDES and CUHK-PEDES test sizes,
  ``recall_metrics`` against a dense ALBEF-style one at COCO 5k (``benchmarks/metrics_cases.py``); the numbers
  of both must agree.
- ``scale``: person-retrieval metrics of 100,000 x 100,000 straight from features: peak memory.
- ``step``: DM-Adapter's training step against full fine-tuning and against the frozen forward + backward, then
  the papers' comparison at batch 32: peak memory and step time of DM-Adapter and of the ``lora`` baseline against
  the ``full`` one (``benchmarks/step_cases.py``).
- ``experts``: ``adapter.ep_size=2`` against ``ep_size=1`` on 2 ranks started by the deepspeed launcher with
  default settings (``tools/bench_train.py``, the demo's model).
- ``reader``: the shard reader against a folder of JPEGs at 2 and 0 workers (``benchmarks/reader_cases.py``),
  and the cost of checking every shard's sha256 against its manifest as it streams (0 workers).
- ``gpu``: where a GPU is visible: DM-Adapter ViT-B/16 bf16 at batch 32 (step time, peak memory against the
  paper's 2,952 MB) and evaluation at ICFG size on the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import checkout  # noqa: E402,F401  (dsmoe importable from a checkout)

TOOLS = Path(__file__).resolve().parent

from benchmarks import measure  # noqa: E402
from dsmoe.launcher import available_cores  # noqa: E402

SECTIONS = ("metrics", "scale", "step", "experts", "reader", "gpu")
PAPER_MEMORY_MB = 2952  # DM-Adapter's reported training memory, ViT-B/16 at batch 32 (bf16)
PAPER_FULL_MEMORY_MB = 7034  # full fine-tuning's in DM-Adapter's paper, same setting


def run_one_case(case: str, variant: str, options: dict) -> None:
    """Inside a case process."""
    from benchmarks import metrics_cases, reader_cases, step_cases

    cases = {"rank": metrics_cases.rank_case, "recall": metrics_cases.recall_case,
             "scale": metrics_cases.scale_case, "step": step_cases.step_case, "reader": reader_cases.reader_case}
    if case not in ("step", "reader"):
        import torch

        torch.set_num_threads(options["threads"])
    cases[case](variant, options)


class Table:
    """Rows of (figure, value, target, met) printed as they come and kept for the JSON."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, figure: str, value: str, target: str = "", met: bool | None = None, **figures) -> None:
        row = {"figure": figure, "value": value, "target": target, "met": met, **figures}
        self.rows.append(row)
        mark = {True: "yes", False: "NO", None: ""}[met]
        print(f"{figure:<58} {value:>30} {target:>12} {mark:>4}", flush=True)


def _ratio(a: measure.Samples, b: measure.Samples) -> tuple[float, float]:
    """(min ratio, median ratio) of a's times over b's."""
    sa, sb = a.summary(), b.summary()
    return sa["min_s"] / sb["min_s"], sa["median_s"] / sb["median_s"]


def metrics_section(table: Table, quick: bool, repeats: int, threads: int, figures: dict) -> None:
    from benchmarks.metrics_cases import QUICK_SIZES, SIZES, agree

    sizes = QUICK_SIZES if quick else SIZES
    for label, case, size in (("rank_metrics ICFG-PEDES test", "rank", "icfg"),
                              ("rank_metrics CUHK-PEDES test", "rank", "cuhk"),
                              ("recall_metrics COCO 5k", "recall", "coco")):
        shape = sizes[size]
        runs = measure.interleaved(case, ["dense", "dsmoe"], {"size": shape, "threads": threads}, repeats, threads)
        dense, ours = runs["dense"], runs["dsmoe"]
        same = agree(dense.results[0]["metrics"], ours.results[0]["metrics"])
        faster_min, faster_median = _ratio(dense, ours)
        need = 5.0 if case == "rank" else 3.0
        figures[f"{case}_{size}"] = {"shape": shape, "dense": dense.summary(), "dsmoe": ours.summary(),
                                     "metrics_agree": same, "metrics": ours.results[0]["metrics"]}
        table.add(f"{label}: dense time / dsmoe time", f"{faster_min:.1f}x min, {faster_median:.1f}x median",
                  f">= {need:.0f}x" if size != "cuhk" else "", (faster_median >= need and same)
                  if size != "cuhk" else same)
        if size == "icfg":
            extra_dense = max(dense.extra_rss_mib)
            extra_ours = max(ours.extra_rss_mib)
            table.add(f"{label}: extra peak RSS, dsmoe / dense", f"{extra_ours:.0f} / {extra_dense:.0f} MiB",
                      "<= 1/10", extra_ours <= extra_dense / 10)
        if not same:
            table.add(f"{label}: metrics differ", json.dumps([dense.results[0]["metrics"],
                                                             ours.results[0]["metrics"]]), "agree", False)


def scale_section(table: Table, quick: bool, threads: int, figures: dict) -> None:
    from benchmarks.metrics_cases import QUICK_SIZES, SIZES

    shape = (QUICK_SIZES if quick else SIZES)["scale"]
    run = measure.run_case("scale", "dsmoe", {"size": shape, "threads": threads}, threads, timeout=7200)
    figures["scale"] = {"shape": shape, **run}
    table.add(f"evaluation {shape['queries']:,} x {shape['gallery']:,} from features: peak extra RSS",
              f"{run['extra_rss_mib']:.0f} MiB in {run['seconds']:.0f} s", "< 4096 MiB",
              run["extra_rss_mib"] < 4096)


def step_section(table: Table, quick: bool, repeats: int, threads: int, figures: dict) -> None:
    from benchmarks.step_cases import MEMORY_SHAPES, QUICK_SHAPES, SHAPES

    shapes = QUICK_SHAPES if quick else SHAPES
    variants = ["dm", "full", "floor"] + (["lora"] if quick else [])  # quick: one set of runs for both comparisons
    runs = measure.interleaved("step", variants, {"shapes": shapes, "threads": 1}, repeats, 1)
    figures["step"] = {"shapes": shapes, **{k: v.summary() for k, v in runs.items()}}
    full_min, full_median = _ratio(runs["dm"], runs["full"])
    floor_min, floor_median = _ratio(runs["dm"], runs["floor"])
    table.add("DM-Adapter step / full fine-tune step (1 thread)", f"{full_min:.2f} min, {full_median:.2f} median",
              "<= 0.70", full_median <= 0.70)
    table.add("DM-Adapter step / frozen forward + backward (1 thread)",
              f"{floor_min:.2f} min, {floor_median:.2f} median", "<= 1.10", floor_median <= 1.10)
    # the papers' comparison: peak memory and step time at batch 32 against the two baselines (one round)
    used = 1 if quick else threads
    if not quick:
        shapes = MEMORY_SHAPES
        runs = measure.interleaved("step", ["dm", "lora", "full"], {"shapes": shapes, "threads": used}, 1, used)
    peak = {name: runs[name].results[0]["peak_mib"] for name in ("dm", "lora", "full")}
    figures["baselines_step"] = {"shapes": shapes, "threads": used, "peak_mib": peak,
                                 **{k: runs[k].summary() for k in peak}}
    batch = f"batch {shapes['batch']}, {used} thread{'s' if used > 1 else ''}"
    for name, label in (("dm", "DM-Adapter"), ("lora", "LoRA")):
        table.add(f"{label} / full fine-tune peak memory ({batch})",
                  f"{peak[name]:.0f} / {peak['full']:.0f} MiB = {peak[name] / peak['full']:.2f}",
                  f"paper {PAPER_MEMORY_MB / PAPER_FULL_MEMORY_MB:.2f}" if name == "dm" else "", None)
        table.add(f"{label} step / full fine-tune step ({batch})", f"{_ratio(runs[name], runs['full'])[0]:.2f}",
                  "", None)


def _tiny_clip(work: Path) -> Path:
    """A CLIP of the demo's size with random weights (speed does not depend on the values)."""
    out = work / "demo-size-clip"
    if not (out / "config.json").exists():
        from transformers import CLIPConfig, CLIPModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # keep the table readable
        CLIPModel(CLIPConfig(
            text_config={"vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999, "hidden_size": 64,
                         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "max_position_embeddings": 32},
            vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            projection_dim=64)).save_pretrained(out)
    return out


def _bench_train(arguments: list[str], ranks: int) -> dict:
    from dsmoe.launcher import free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(free_port()), str(TOOLS / "bench_train.py"), *arguments]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # defaults
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    found = [line[line.index("{"):] for line in proc.stdout.splitlines() if '"step_s_median"' in line]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"bench_train failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(found[0])


def experts_section(table: Table, quick: bool, repeats: int, work: Path, figures: dict) -> None:
    from dsmoe.config import DEFAULT_DEMO_CONFIG

    clip = _tiny_clip(work)
    steps = ["--steps", "3", "--warmup", "1"] if quick else ["--steps", "20", "--warmup", "3"]
    common = ["--config", str(DEFAULT_DEMO_CONFIG), "--clip", str(clip), "--batch", "16", "--ds_config", "zero2.json",
              *steps]
    samples = {1: measure.Samples(), 2: measure.Samples()}
    for _ in range(repeats):
        for ep in (1, 2):
            run = _bench_train([*common, "--set", f"adapter.ep_size={ep}"], ranks=2)
            samples[ep].add({"seconds": run["step_s_median"], **run})
    ratio_min, ratio_median = _ratio(samples[2], samples[1])
    threads = samples[2].results[0].get("threads_per_rank")
    figures["experts"] = {"ep1": samples[1].summary(), "ep2": samples[2].summary(), "threads_per_rank": threads}
    table.add(f"ep_size=2 / ep_size=1 step, 2 CPU ranks ({threads} threads each)",
              f"{ratio_min:.2f} min, {ratio_median:.2f} median", "<= 1.3", ratio_median <= 1.3)


def reader_section(table: Table, quick: bool, repeats: int, threads: int, work: Path, figures: dict) -> None:
    from benchmarks import reader_cases

    sizes = reader_cases.QUICK_SIZES if quick else reader_cases.SIZES
    paths = reader_cases.prepare(work, sizes)
    for workers in (2, 0):
        variants = ["shards", "folder"] + ([] if workers else ["shards-unchecked"])
        runs = measure.interleaved("reader", variants,
                                   {"paths": paths, "sizes": sizes, "workers": workers, "threads": threads},
                                   repeats, threads)
        slower_min, slower_median = _ratio(runs["folder"], runs["shards"])
        need = 3.0 if workers else 1.0
        rate = runs["shards"].results[-1]["pairs_per_s"]
        figures[f"reader_{workers}_workers"] = {k: v.summary() for k, v in runs.items()}
        table.add(f"shard reader / folder reader, {workers} workers ({rate:.0f} pairs/s)",
                  f"{slower_min:.1f}x min, {slower_median:.1f}x median", f">= {need:.0f}x" if workers else "> 1x",
                  slower_median >= need if workers else slower_median > need)
        if "shards-unchecked" in runs:
            cost_min, cost_median = _ratio(runs["shards"], runs["shards-unchecked"])
            table.add("shard reader with sha256 checks / without, 0 workers",
                      f"{cost_min:.3f}x min, {cost_median:.3f}x median", "<= 1.05x", cost_median <= 1.05)


def gpu_section(table: Table, quick: bool, threads: int, figures: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        table.add("GPU section", "skipped: no GPU visible")
        return
    batch = 4 if quick else 32
    run = _bench_train(["--ds_config", "zero2_bf16.json", "--batch", str(batch), "--steps", "3" if quick else "10",
                        "--warmup", "1" if quick else "3"], ranks=1)
    figures["gpu_step"] = run
    table.add(f"GPU DM-Adapter ViT-B/16 bf16 batch {batch}: step", f"{run['step_s_median'] * 1000:.0f} ms",
              "", None)
    table.add(f"GPU DM-Adapter ViT-B/16 bf16 batch {batch}: peak allocated",
              f"{run['peak_allocated_MiB'] * 1.048576:.0f} MB", f"vs {PAPER_MEMORY_MB} MB", None)
    from benchmarks.metrics_cases import QUICK_SIZES, SIZES, person_features
    from dsmoe.metrics import rank_metrics_from_features

    texts, text_ids, images, image_ids = person_features(**(QUICK_SIZES if quick else SIZES)["icfg"])
    device = torch.device("cuda")
    texts, images = texts.to(device, torch.bfloat16), images.to(device, torch.bfloat16)
    text_ids, image_ids = text_ids.to(device), image_ids.to(device)
    rank_metrics_from_features(texts, text_ids, images, image_ids)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = rank_metrics_from_features(texts, text_ids, images, image_ids)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    figures["gpu_eval"] = {"seconds": seconds, "metrics": metrics}
    table.add("GPU evaluation at ICFG size from bf16 features", f"{seconds * 1000:.0f} ms", "", None)


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model or platform.processor(), "cores": available_cores(), "load_1min_at_start": load,
            "python": platform.python_version()}


def write_figures(figures: dict, table: Table, path: Path | None) -> None:
    """The figures with the table's rows as JSON, to ``path`` (or printed)."""
    figures["rows"] = table.rows
    text = json.dumps(figures, indent=2)
    if path:
        path.write_text(text)
        print(f"figures written to {path}")
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized inputs, one repeat")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma separated: {SECTIONS}")
    parser.add_argument("--repeat", type=int, default=None, help="rounds of interleaved runs (default 3; 1 quick)")
    parser.add_argument("--threads", type=int, default=available_cores(),
                        help="torch threads of the metrics and reader processes (the step runs on 1)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dsmoe-bench"))
    parser.add_argument("--json", type=Path, default=None, help="where to write the figures (default: print)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_one_case(args.case, args.variant, json.loads(args.options))
        return 0
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    repeats = args.repeat or (1 if args.quick else 3)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"command": "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d"), "machine": machine(), "quick": args.quick,
                     "repeats": repeats, "threads": args.threads}
    print(f"machine: {figures['machine']['cpu']}, {figures['machine']['cores']} cores, load "
          f"{figures['machine']['load_1min_at_start']}; {repeats} interleaved repeats"
          + (" (quick: CI-sized inputs, targets not meaningful)" if args.quick else ""))
    table = Table()
    print(f"{'figure':<58} {'value':>30} {'target':>12} {'met':>4}")
    if "metrics" in sections:
        metrics_section(table, args.quick, repeats, args.threads, figures)
    if "scale" in sections:
        scale_section(table, args.quick, args.threads, figures)
    if "step" in sections:
        step_section(table, args.quick, repeats, args.threads, figures)
    if "experts" in sections:
        experts_section(table, args.quick, repeats, args.work_dir, figures)
    if "reader" in sections:
        reader_section(table, args.quick, repeats, args.threads, args.work_dir, figures)
    if "gpu" in sections:
        gpu_section(table, args.quick, args.threads, figures)
    write_figures(figures, table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
