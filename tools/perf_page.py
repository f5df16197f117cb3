"""The tables of docs/performance.md, made from the benchmark runs committed in docs/bench/ (``tools/bench.py
--json``), so that the page shows measured output only.

    python tools/perf_page.py           # rewrite the tables between the page's bench markers
    python tools/perf_page.py --check   # exit 1 when the page's tables are not what the JSON files say

A table stands between ``<!-- bench: docs/bench/NAME.json -->`` and ``<!-- /bench -->``; the text around the
markers is the page's own.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"
BLOCK = re.compile(r"(<!-- bench: (?P<file>\S+) -->\n)(?P<table>.*?)(<!-- /bench -->)", re.S)


def table(run: dict) -> str:
    """One run's rows as markdown, with the command, the machine and its load."""
    machine = run["machine"]
    load = machine.get("load_1min_at_start")
    head = (f"`{run['command']}` on {machine['cpu']}, {machine['cores']} cores (1-minute load "
            f"{load:.2f} at the start), {run['date']}, {run['repeats']} interleaved repeats"
            + (" (quick: CI-sized inputs)" if run.get("quick") else "") + ":\n\n")
    rows = ["| figure | value | target | met |", "|---|---|---|---|"]
    mark = {True: "yes", False: "**no**", None: ""}
    rows += [f"| {row['figure']} | {row['value']} | {row['target']} | {mark[row['met']]} |" for row in run["rows"]]
    return head + "\n".join(rows) + "\n"


def render(page: str) -> str:
    def block(match: re.Match) -> str:
        run = json.loads((ROOT / match["file"]).read_text())
        return match.group(1) + table(run) + match.group(4)
    return BLOCK.sub(block, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say whether the page is up to date")
    args = parser.parse_args(argv)
    page = PAGE.read_text()
    rendered = render(page)
    if args.check:
        if rendered != page:
            print(f"{PAGE} is not what docs/bench/ says: run python tools/perf_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(rendered)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
