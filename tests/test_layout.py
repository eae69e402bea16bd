"""The package's shape (issue 19): test support lives outside it; no import circles; the layers of
``[tool.importlinter]`` (pyproject.toml, docs/layout.md) kept, checked by ``lint-imports``; registries read."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dali_arb"
#: Circles still to break. Shrinks only (issue 19 broke the last: data.manifest <-> data.cache).
KNOWN_CIRCLES: list[set[str]] = []


@pytest.mark.parametrize("name", ["loopback", "reference"])
def test_test_support_is_not_part_of_the_package(name):
    assert importlib.util.find_spec(f"dali_arb.{name}") is None, f"dali_arb.{name} ships test support to users"
    assert importlib.util.find_spec(f"support.{name}") is not None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (lazy imports inside functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_but_the_known_ones():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) - {"dali_arb"} for p in paths}
    circles = _circles(graph)
    assert all(c in KNOWN_CIRCLES for c in circles), (
        f"new import circles: {[c for c in circles if c not in KNOWN_CIRCLES]}"
    )
    assert all(k in circles for k in KNOWN_CIRCLES), "a known circle is gone: remove it from KNOWN_CIRCLES"


def _choices(parser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if a.choices and command in a.choices).choices[command]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_the_cli_reads_its_choices_from_their_owners():
    """The CLI lists no decoder, worker kind, JPEG scaling or leftover policy of its own (issue 19)."""
    from dali_arb.cli import build_parser
    from dali_arb.index.engines import ENGINES
    from dali_arb.loader.decoders import DECODERS, JPEG_SCALINGS
    from dali_arb.loader.workers import WORKER_KINDS
    from dali_arb.plan.planner import LeftoverPolicy

    parser = build_parser()
    assert _choices(parser, "preview", "--decoder") == ["auto", *DECODERS]
    assert _choices(parser, "preview", "--worker-kind") == list(WORKER_KINDS)
    assert _choices(parser, "bench", "--jpeg-scaling") == list(JPEG_SCALINGS)
    assert _choices(parser, "plan", "--leftover") == [p.value for p in LeftoverPolicy]
    assert _choices(parser, "index", "--engine") == list(ENGINES)


# -- the indexer's table of readers (issue 19) -----------------------------------------------------------------


def _read_jsonl(run, source: str) -> None:
    """A reader a user might add: JSON Lines metadata, one ``{"key", "width", "height"}`` per line."""
    import json

    from dali_arb.index.records import Row

    lines = Path(source).read_text(encoding="utf-8").splitlines()
    rows = [Row(d["key"], d["width"], d["height"], None, None, None, None, None) for d in map(json.loads, lines)]
    run.take(rows, [], len(rows))


@pytest.fixture
def jsonl_reader(monkeypatch):
    from dali_arb.index.readers import READERS, Reader

    reader = Reader("jsonl", "JSON Lines metadata (.jsonl)", False, lambda s: s.endswith(".jsonl"), _read_jsonl)
    monkeypatch.setitem(READERS, "jsonl", reader)
    return reader


def test_a_registered_reader_indexes_its_sources(tmp_path, jsonl_reader):
    from dali_arb.data.manifest import Manifest
    from dali_arb.index import build_index

    source = tmp_path / "meta.jsonl"
    source.write_text('{"key": "a", "width": 640, "height": 480}\n{"key": "b", "width": 480, "height": 640}\n')
    summary = build_index([str(source)], tmp_path / "m.parquet", progress=False, workers=1)
    table = Manifest.read(tmp_path / "m.parquet").table
    assert (summary.rows, summary.files_seen) == (2, 2)
    assert table.select(["key", "width", "height"]).to_pylist() == [
        {"key": "a", "width": 640, "height": 480},
        {"key": "b", "width": 480, "height": 640},
    ]


def test_a_registered_remote_reader_comes_before_the_prefix_fallback(monkeypatch):
    from dali_arb.index.readers import READERS, Reader, reader_for

    assert reader_for("s3://bucket/meta.jsonl").name == "remote_folder"  # (any other URL is a prefix)
    monkeypatch.setitem(READERS, "remote_jsonl", Reader("remote_jsonl", "a .jsonl URL", True, lambda u: u.endswith(".jsonl"), _read_jsonl))  # fmt: skip
    assert reader_for("s3://bucket/meta.jsonl").name == "remote_jsonl"
    assert reader_for("s3://bucket/photos/").name == "remote_folder"


def test_the_cannot_index_error_and_the_cli_help_list_the_readers(tmp_path, jsonl_reader):
    from dali_arb.cli import build_parser
    from dali_arb.errors import IndexingError
    from dali_arb.index import build_index
    from dali_arb.index.readers import READERS

    (tmp_path / "x.zip").write_bytes(b"x")
    with pytest.raises(IndexingError, match="don't know how to index") as caught:
        build_index([str(tmp_path / "x.zip")], tmp_path / "m.parquet", progress=False)
    local = [r.accepts for r in READERS.values() if not r.remote]
    assert len(local) == 4 and all(kind in str(caught.value) for kind in local), str(caught.value)
    with pytest.raises(IndexingError, match="source not found") as caught:
        build_index([str(tmp_path / "nope")], tmp_path / "m.parquet", progress=False)
    assert all(kind in str(caught.value) for kind in local), str(caught.value)
    index = next(a for a in build_parser()._actions if a.choices and "index" in a.choices).choices["index"]
    sources = next(a for a in index._actions if a.dest == "sources")
    assert all(r.accepts in " ".join(sources.help.split()) for r in READERS.values()), sources.help


# -- the layers, checked by import-linter (issue 19) -----------------------------------------------------------


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this repository's contracts over the package found in ``package_root``."""
    beside = Path(sys.executable).with_name("lint-imports")
    exe = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports is missing: install the test extra (pip install -e '.[test]', import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    command = [exe, "--no-logo", "--no-cache", str(ROOT / "pyproject.toml")]
    return subprocess.run(command, cwd=package_root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_contracts_catch_what_they_forbid(tmp_path):
    """A copy of the package with forbidden imports, lazy ones included: each breaks its contract, and
    ``dali_arb.torch`` (the adapter) is told apart from ``torch`` (the framework)."""
    copy = tmp_path / "dali_arb"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "samples"))
    additions = {
        "plan/world.py": "\n\ndef _lazy():\n    import pyarrow  # noqa\n",  # plan-pure, lazily
        "loader/blocklist.py": "\n\ndef _lazy():\n    import torch  # noqa\n",  # loader-no-framework
        "data/pairs.py": "\n\ndef _lazy():\n    from ..torch import DALIBucketIterator  # noqa\n",  # layers
        "index/records.py": "\n\ndef _lazy():\n    from ..tools import report  # noqa\n",  # tools-under-cli
        "data/localfiles.py": "\n\ndef _lazy():\n    import ray  # noqa\n",  # ray-in-index-only
    }
    for name, text in additions.items():
        with open(copy / name, "a", encoding="utf-8") as fh:
            fh.write(text)
    result = _lint_imports(tmp_path)
    out = " ".join(result.stdout.split())
    assert result.returncode != 0, out
    assert "dali_arb.plan.world -> pyarrow" in out
    assert "dali_arb.loader.blocklist -> torch" in out
    assert "dali_arb.data.pairs -> dali_arb.torch" in out
    assert "dali_arb.index.records -> dali_arb.tools" in out
    assert "dali_arb.data.localfiles -> ray" in out
    assert "dali_arb.data is not allowed to import dali_arb.torch" in out  # (the layers contract)


def test_every_top_level_module_is_in_a_layer():
    """The layers contract checks only the modules it names: a new top-level module must be named there."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {m.strip(" ()") for layer in layers for m in layer.split("|")}
    top = {
        f"dali_arb.{p.stem}" if p.is_file() else f"dali_arb.{p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()
    }
    assert top <= named, f"not in a layer of [tool.importlinter]: {sorted(top - named)}"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name must be a non-empty string, got ''"),
        ({"accepts": None}, "accepts must say what it reads, got None"),
        ({"read": "read_jsonl"}, "read must be callable, got 'read_jsonl'"),
    ],
)
def test_a_reader_is_validated(fields, message):
    from dali_arb.errors import ConfigError
    from dali_arb.index.readers import Reader

    good = {"name": "jsonl", "accepts": ".jsonl metadata", "remote": False, "recognises": bool, "read": _read_jsonl}
    with pytest.raises(ConfigError, match=message):
        Reader(**{**good, **fields})
