"""The commands on the README and the docs/ pages are ones that work: every dsmoe program they start takes the
options they give it (parsed by the program's own parser), every repository file they name exists, the recipes and
--set keys they use are valid configs, and the performance page's tables are what the committed benchmark runs
say."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from launch import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CONSOLE_SCRIPTS = {"dsmoe-train": "dsmoe.train", "dsmoe-evaluate": "dsmoe.evaluate", "dsmoe-export": "dsmoe.export",
                   "dsmoe-shards": "dsmoe.shards.cli", "dsmoe-retrieve": "dsmoe.retrieve",
                   "dsmoe-report": "dsmoe.report", "dsmoe-sweep": "dsmoe.sweep"}
MODULES = {"dsmoe.shards": "dsmoe.shards.cli", "deepspeed.launcher.runner": None}
SCRIPTS = {"dsmoe/train.py": "dsmoe.train", "tools/make_shards.py": "dsmoe.shards.cli"}
NOT_OURS = {"pip", "cd", "cat", "aws", "tensorboard", "sbatch", "bash", "EOF", "node1", "node2", "source", "scancel",
            "ip"}


def commands() -> list[tuple[str, list[str]]]:
    """(page, tokens) of every command line in the pages' bash blocks (continuations joined, comments dropped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            text = block.replace("\\\n", " ")
            text = re.sub(r"<<'?EOF'?.*?\nEOF", "", text, flags=re.S)  # here-documents are data
            for line in text.splitlines():
                tokens = shlex.split(line, comments=True)
                while tokens and (tokens[0] == "sudo" or re.fullmatch(r"[A-Z_]+=\S*", tokens[0])):
                    tokens = tokens[1:]  # sudo and VAR=value prefixes
                if tokens:
                    found.append((page.name, tokens))
    return found


class _Parsed(Exception):
    pass


def parsed(module: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` as the program ``module``'s own parser reads it (its main stops right after parsing)."""
    if module.startswith("tools/"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, REPO_ROOT / module)
        program = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(REPO_ROOT / "tools"))
        try:
            spec.loader.exec_module(program)
        finally:
            sys.path.remove(str(REPO_ROOT / "tools"))
    else:
        program = importlib.import_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse):
        try:
            program.main(argv)
        except _Parsed as done:
            return done.args[0]
    raise AssertionError(f"{module} returned without parsing its arguments")


def _check_run_options(args: argparse.Namespace) -> None:
    """A recipe of the repository with the --set overrides given is a valid config; a DeepSpeed JSON exists."""
    from dsmoe.config import load_config
    from dsmoe.ds_config import load_ds_config

    config = getattr(args, "config", None)
    if config is None or (REPO_ROOT / config).is_file():
        load_config(REPO_ROOT / config if config else None, getattr(args, "set", []) or [])
    if getattr(args, "ds_config", None) and "/" in args.ds_config:
        assert (REPO_ROOT / args.ds_config).is_file(), args.ds_config
    elif getattr(args, "ds_config", None):
        load_ds_config(args.ds_config)  # a shipped config's name


def _program(tokens: list[str]) -> tuple[str, list[str], list[str]] | None:
    """(module or tools/ script, its arguments, the launcher's arguments) of a command that starts a dsmoe program;
    None for other commands."""
    head = tokens[0]
    if head in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[head], tokens[1:], []
    if head in ("python", "python3") and tokens[1] == "-m":
        return MODULES.get(tokens[2], tokens[2]), tokens[3:], []
    if head in ("python", "python3"):
        script = tokens[1]
        return SCRIPTS.get(script, script), tokens[2:], []
    if head == "deepspeed":
        at = next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "--module")
        script = tokens[at + 1] if tokens[at] == "--module" else tokens[at]
        rest = tokens[at + 2:] if tokens[at] == "--module" else tokens[at + 1:]
        return SCRIPTS.get(script, MODULES.get(script, script)), rest, tokens[1:at]
    return None


def test_the_pages_have_commands():
    pages = {page for page, _ in commands()}
    assert {"README.md", "training.md", "data.md", "evaluation.md", "multi-node.md"} <= pages


@pytest.mark.parametrize("page, tokens", commands(), ids=lambda value: " ".join(value)[:70]
                         if isinstance(value, list) else value)
def test_every_command_on_the_pages_works(page, tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a parser does may depend on being in the checkout
    for token in tokens:  # files of the repository that a command names exist
        path = token.split("=", 1)[-1]
        if re.match(r"(dsmoe|ds_configs|tools|slurm|tests|docs)/[\w./-]+$", path) and "<" not in path:
            assert (REPO_ROOT / path).exists(), (page, path)
    if tokens[0] == "sbatch":  # the script exists; what follows it goes to train.py
        at = next(i for i, t in enumerate(tokens) if t.endswith(".sbatch"))
        program = ("dsmoe.train", tokens[at + 1:], []) if tokens[at].endswith("train.sbatch") else None
    elif tokens[0] == "bash":
        assert (REPO_ROOT / tokens[1]).is_file(), tokens
        program = None
    else:
        program = _program(tokens)
    if program is None:
        assert tokens[0] in NOT_OURS | {"sbatch", "bash"}, f"{page}: a command this test does not know: {tokens}"
        return
    module, argv, launcher = program
    if launcher:
        from deepspeed.launcher.runner import parse_args as launcher_args

        launcher_args([*launcher, "user_script.py"])
    args = parsed(module, argv)
    if module == "dsmoe.train":
        _check_run_options(args)


def test_the_performance_page_is_what_the_committed_runs_say():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "perf_page.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
