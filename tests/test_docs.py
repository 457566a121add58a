"""Every command and Python snippet in README.md and docs/*.md still works.

Fenced ``bash`` blocks, and the lines of other non-Python blocks that start with python / make / pip: each
logical line (``\\`` continuations joined, comments dropped) is split into commands (``&&``, ``;``, ``|``); a
wrapper (``gcloud ... --command "..."``, ``srun ...``, ``nice ...``) is searched for the ``python`` command
inside it. ``make X`` must name a Makefile target, ``pip install`` a constraints file that exists and extras that
pyproject.toml defines, and ``python -m MODULE ARGS`` / ``python train.py ARGS`` must
parse: the CLI's ``main(argv)`` runs in this process with ``ArgumentParser.parse_args`` (and
``parse_known_args``) raising :class:`Parsed` right after a successful parse, so nothing runs and a bad flag
is argparse's SystemExit(2). ``--config.a.b=v`` overrides are applied to the named config
(:func:`calico_jax.train.config.load`, which rejects an unknown field or a bad value), and the command after
``calico_jax.launch``'s ``--`` is checked as its own command. Placeholders (DIR, a.jpg) are fine: only parsing
happens. Fenced ``python`` blocks run for real, each in a fresh interpreter, in a directory holding what they
name: a tiny exported CALICO at ``runs/demo/model`` (random weights, a tiny tokenizer) and ``a.png`` / ``b.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# Modules another change is adding: their commands are skipped (and counted) only while the module is absent.
PENDING_MODULES: frozenset[str] = frozenset()
# Not this project's CLIs: nothing to parse.
TOOL_MODULES = frozenset({"venv", "pytest"})
# The CLIs whose main(argv) parses with argparse before doing anything: only these are called (another module's main
# might act on its arguments for real). A new command in the docs adds its module here once that holds.
KNOWN_CLIS = frozenset({
    "calico_jax.predict", "calico_jax.evaluate", "calico_jax.export", "calico_jax.demo", "calico_jax.launch",
    "calico_jax.data.synthetic", "calico_jax.data.pairs", "calico_jax.data.pipeline", "calico_jax.data.pack",
    "convert", "bench", "bench.nscale", "bench.inference_scale", "bench.data_scale", "bench.predict_plans",
    "train.py"})
SEPARATORS = frozenset({"&&", "||", ";", "|"})
COMMAND_LINE = re.compile(r"(\S*/)?(python3?|make|pip3?) ")   # a command line in a block not tagged bash


@dataclass(frozen=True)
class Snippet:
    where: str          # "docs/x.md:12"
    lang: str
    text: str


def fenced_blocks(path: Path) -> list[Snippet]:
    out, lang, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), n + 1, []
        elif fence:
            out.append(Snippet(f"{path.relative_to(ROOT)}:{start}", lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path}: unterminated code fence"
    return out


def logical_lines(snippet: Snippet) -> list[tuple[str, str]]:
    """(where, line) with backslash continuations joined; blank and comment lines dropped."""
    file, first = snippet.where.rsplit(":", 1)
    out, buf, at = [], "", None
    for k, line in enumerate(snippet.text.splitlines()):
        at = at if buf else f"{file}:{int(first) + k}"
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip() and not buf.lstrip().startswith("#"):
            out.append((at, buf.strip()))
        buf = ""
    assert not buf, f"{snippet.where}: a continuation runs past the block's end"
    return out


def is_python(token: str) -> bool:
    return re.fullmatch(r"(.*/)?python3?(\.\d+)?", token) is not None


def commands(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """("make" | "pip" | "python", args) for every checkable command in a shell line's tokens."""
    found, seg = [], []
    for tok in [*tokens, ";"]:
        if tok not in SEPARATORS:
            seg.append(tok)
            continue
        if not seg:
            continue
        pip_at = next((i for i, t in enumerate(seg) if re.fullmatch(r"(.*/)?pip3?", t)), None)
        py_at = next((i for i, t in enumerate(seg) if is_python(t)), None)
        if seg[0] == "make":
            found.append(("make", seg[1:]))
        elif pip_at is not None:
            found.append(("pip", seg[pip_at + 1:]))
        elif py_at is not None and seg[py_at + 1:py_at + 3] == ["-m", "pip"]:
            found.append(("pip", seg[py_at + 3:]))
        elif py_at is not None:
            found.append(("python", seg[py_at + 1:]))
        else:                                  # a wrapper: look inside its quoted arguments
            for inner in (t for t in seg if " " in t):
                found += commands(shlex.split(inner, comments=True))
        seg = []
    return found


def collect() -> tuple[list, list[Snippet]]:
    shell, python = [], []
    for path in DOC_FILES:
        for snippet in fenced_blocks(path):
            if snippet.lang == "python":
                python.append(snippet)
            else:   # an untagged (or text) block is checked too where a line is a command
                for where, line in logical_lines(snippet):
                    if snippet.lang in ("bash", "sh", "shell") or COMMAND_LINE.match(line):
                        shell.append((where, line, commands(shlex.split(line, comments=True))))
    return shell, python


SHELL, PYTHON = collect()
PY_COMMANDS = [(where, line, args) for where, line, cmds in SHELL for kind, args in cmds if kind == "python"]


# ------------------------------------------------------------------------------------------ parsing only
class Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@pytest.fixture
def parse_only(monkeypatch):
    """ArgumentParser.parse_args / parse_known_args raise Parsed after a successful parse (the outermost call:
    parse_args uses parse_known_args itself, and must still reject leftover arguments)."""
    real_args, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_args(self, args=None, namespace=None):
        depth[0] += 1
        try:
            ns = real_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise Parsed(ns)

    def parse_known_args(self, args=None, namespace=None):
        result = real_known(self, args, namespace)
        if depth[0] == 0:
            raise Parsed(result[0])
        return result

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.chdir(ROOT)


def entry_point(args: list[str]):
    """(name, main) of a `python ARGS` command, or (name, None) for a tool that is not ours."""
    name = args[1] if args[:1] == ["-m"] else args[0]
    if name in TOOL_MODULES:
        return name, None
    if name not in KNOWN_CLIS:
        pytest.fail(f"{name}: not a known command-line tool of this project (KNOWN_CLIS in {Path(__file__).name})")
    if args[:1] == ["-m"]:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name and name in PENDING_MODULES:
                pytest.skip(f"{name} does not exist yet")
            raise
        if not hasattr(module, "main"):
            module = importlib.import_module(f"{name}.__main__")
        return name, module.main
    script = ROOT / args[0]
    assert args[0].endswith(".py") and script.is_file(), f"not a python -m command or a script here: {args[0]}"
    spec = importlib.util.spec_from_file_location(f"_docs_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return args[0], module.main


def check_parses(where: str, args: list[str]) -> None:
    name, main = entry_point(args)
    if main is None:
        return
    argv = args[2:] if args[0] == "-m" else args[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except Parsed as p:
        namespace = p.namespace
    except SystemExit as e:
        pytest.fail(f"{where}: `{name} {shlex.join(argv)}` does not parse (exit {e.code}): {err.getvalue().strip()}")
    else:
        pytest.fail(f"{where}: `{name} {shlex.join(argv)}` returned without parsing its arguments")
    if name == "calico_jax.launch":   # its command after "--" is a command of its own
        check_parses(f"{where} (after --)", argv[argv.index("--") + 1:])
        return
    if any(a.startswith("--config.") for a in argv):
        from calico_jax.core.config import ConfigError, split_overrides
        from calico_jax.train.config import load
        overrides, _ = split_overrides(argv)
        try:
            load(namespace.config, overrides)
        except ConfigError as e:
            pytest.fail(f"{where}: `{name}`: an override does not apply to {namespace.config}: {e}")


@pytest.mark.parametrize("where,line,args", PY_COMMANDS, ids=[w for w, _, _ in PY_COMMANDS])
def test_command_parses(where, line, args, parse_only):
    check_parses(where, args)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, flags=re.M))


def test_shell_lines_are_all_checkable():
    """No command in the docs escapes the checks: every shell line holds a make, pip or python command."""
    assert PY_COMMANDS, "no python commands found in the docs"
    bare = [f"{where}: {line}" for where, line, cmds in SHELL if not cmds]
    assert not bare, "commands the docs test cannot check:\n" + "\n".join(bare)


def test_make_targets_and_pip_installs_exist():
    targets = makefile_targets()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    problems = []
    for where, line, cmds in SHELL:
        for kind, args in cmds:
            if kind == "make":
                problems += [f"{where}: make target {t!r} is not in the Makefile"
                             for t in args if "=" not in t and not t.startswith("-") and t not in targets]
            elif kind == "pip":
                assert args[:1] == ["install"], f"{where}: {line}"
                for flag, value in zip(args, args[1:]):
                    if flag == "-c" and not (ROOT / value).is_file():
                        problems.append(f"{where}: constraints file {value} does not exist")
                for spec in args[1:]:
                    if m := re.fullmatch(r"\.\[([\w,-]+)\]", spec):
                        problems += [f"{where}: pyproject.toml has no extra {e!r}"
                                     for e in m.group(1).split(",") if e not in extras]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ links, length
def test_readme_stays_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move depth to docs/"


def test_relative_links_resolve():
    broken = []
    for path in DOC_FILES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+://|#|mailto:", target):
                    continue
                if not (path.parent / target.split("#")[0]).exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


# ------------------------------------------------------------------------------------------ python blocks
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A directory with runs/demo/model (a tiny random CALICO, exported with its tokenizer) and a.png, b.png."""
    from PIL import Image

    from calico_jax.checkpoints import converted
    from calico_jax.core.tokens import SEG_TOKEN
    from calico_jax.data.tokenize import DEFAULT_CORPUS, build_tiny_tokenizer
    from calico_jax.inference.export import save
    from calico_jax.inference.predictor import INFERENCE_FILE, InferenceConfig
    from calico_jax.models.calico import Calico, CalicoConfig

    root = tmp_path_factory.mktemp("docs")
    tok_dir = root / "tok"
    texts = list(DEFAULT_CORPUS) + ["The images show <p> wheel </p> [SEG] (IMAGE1) [SEG] (IMAGE2)."] * 8
    tokenizer = build_tiny_tokenizer(tok_dir, texts, vocab_size=256)
    base = CalicoConfig.tiny()
    config = base.replace(llm=base.llm.replace(vocab_size=len(tokenizer)),
                          seg=base.seg.replace(token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN), identifier_ids=()),
                          preprocess=base.preprocess.replace(mask_size=64))
    model = root / "runs" / "demo" / "model"
    save(model, config, converted.init_params(Calico(config), seed=0), tok_dir)
    (model / INFERENCE_FILE).write_text(json.dumps(InferenceConfig(max_new_tokens=8).to_dict()))
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (37, 53)), ("b.png", (61, 45))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.mark.parametrize("snippet", PYTHON, ids=[s.where for s in PYTHON])
def test_python_snippet_runs(snippet, sandbox):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", snippet.text], cwd=sandbox, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, f"{snippet.where}: the snippet failed:\n{run.stderr[-3000:]}"
