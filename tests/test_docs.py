"""The docs (issue 23): the site builds with ``mkdocs build --strict`` (a broken link, a missing anchor, a page left
out of the nav or a missing include fails it), the contract page names every command, option and public name, and the
README's two commands and links lead somewhere."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dali_arb
from dali_arb.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
README = ROOT / "README.md"


def _mkdocs_build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``, run in ``cwd`` (where snippet includes are found)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every ``dali-arb`` subcommand and its parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _code_text(markdown: str) -> str:
    """The text of every fenced block and code span of ``markdown``, joined."""
    fences = re.findall(r"^```.*?^```", markdown, flags=re.M | re.S)
    rest = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return "\n".join(fences + re.findall(r"`[^`\n]+`", rest))


def test_site_builds_strictly(tmp_path):
    """The whole site, as CI builds it; the benchmarks page includes benchmarks/RESULTS.md."""
    site = tmp_path / "site"
    done = _mkdocs_build(ROOT / "mkdocs.yml", site, ROOT)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "index.html").is_file()
    results_heading = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()[0].lstrip("# ").strip()
    assert results_heading in (site / "benchmarks" / "index.html").read_text()


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is really strict: a link to a missing page, one to a missing heading and a page left out of
    the nav (another helper's page whose nav line is still commented in mkdocs.yml) each fail it, named."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    (copy / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", copy / "benchmarks")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](no-such-page.md) and [gone too](buckets.md#no-such-heading)\n")
    (copy / "docs" / "orphan.md").write_text("# Not in the nav\n")
    done = _mkdocs_build(copy / "mkdocs.yml", tmp_path / "site", copy)
    assert done.returncode != 0
    assert "orphan.md" in done.stdout + done.stderr
    assert "no-such-page.md" in done.stdout + done.stderr
    assert "no-such-heading" in done.stdout + done.stderr


def test_every_command_is_in_the_contract():
    text = CONTRACT.read_text()
    missing = [name for name in _commands() if not re.search(rf"`(dali-arb )?{re.escape(name)}[` ]", text)]
    assert not missing, f"docs/contract.md does not name the dali-arb command(s) {missing}"


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"})


def test_every_option_is_in_the_contract():
    """Every long option of every command (and of ``dali-arb`` itself) is named on the contract page."""
    text = CONTRACT.read_text()
    parsers = {"dali-arb": build_parser(), **_commands()}
    missing = {
        name: [o for o in _long_options(parser) if not re.search(rf"{re.escape(o)}(?![\w-])", text)]
        for name, parser in parsers.items()
    }
    missing = {name: options for name, options in missing.items() if options}
    assert not missing, f"docs/contract.md does not mention these options: {missing}"


def test_every_public_name_is_in_the_contract():
    code = _code_text(CONTRACT.read_text())
    missing = [name for name in dali_arb.__all__ if not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", code)]
    assert not missing, f"docs/contract.md does not name these public names of dali_arb.__all__ in code: {missing}"


def test_the_readme_commands_are_makefile_targets():
    """README's two commands from a fresh clone (`make demo`, `make test`) are targets of the Makefile."""
    commands = set(re.findall(r"^make (\w+)", README.read_text(), flags=re.M))
    assert {"demo", "test"} <= commands, f"README's commands: {sorted(commands)}"
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    assert commands <= targets, f"README runs make {sorted(commands - targets)}, which the Makefile lacks"
    assert "docs" in targets and re.search(r"mkdocs build --strict", makefile)


def test_the_readme_links_lead_to_files():
    """README's relative links (into docs/) name files that exist: mkdocs does not check README."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "README links into the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
