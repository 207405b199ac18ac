"""The wheel as users get it: built from this checkout, installed into fresh virtualenvs
outside the repository, one with torch alone (the regulariser), one with the `suite` extra
(a smoke training and the console commands).

The fresh environments get their third-party packages by linking the distributions this
test's own environment has installed (the dependency closure of what the wheel declares,
package folders and .dist-info alike) instead of installing them again: seconds instead of
gigabytes of torch, with the same files. The wheel itself is installed by pip.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SUITE_ONLY = ("hydra", "omegaconf", "accelerate", "diffusers")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel, built from a copy of the checkout (setuptools writes build/ beside the
    sources, and a stale build/ there could put deleted files into the wheel), and what
    the build printed."""
    source, out = tmp_path_factory.mktemp("src") / "isodiff", tmp_path_factory.mktemp("dist")
    anywhere = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
    top = {".git", ".venv", "build", "dist", "runs", "results", "outputs", "multirun"}

    def ignore(folder: str, names: list[str]) -> set[str]:  # isodiff/runs/ is a package
        return set(anywhere(folder, names)) | (top & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, source, ignore=ignore)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return next(out.glob("isodiff-*.whl")), done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(built: tuple[Path, str]) -> Path:
    return built[0]


def test_the_wheel_builds_without_a_warning(built: tuple[Path, str]) -> None:
    warned = [line for line in built[1].splitlines() if "warning" in line.lower()]
    assert not warned, "\n".join(warned)


def _closure(requirements: list[str], extras: tuple[str, ...] = ()) -> dict[str, md.Distribution]:
    """Every installed distribution that the requirements need, recursively."""
    found: dict[str, md.Distribution] = {}
    todo = [(r, extras) for r in requirements]
    while todo:
        text, active = todo.pop()
        req = Requirement(text)
        env = default_environment()
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (*active, "")):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in found:
            continue
        dist = md.distribution(req.name)
        found[name] = dist
        todo += [(r, tuple(req.extras)) for r in dist.requires or []]
    return found


def fresh_env(root: Path, dists: dict[str, md.Distribution]) -> Path:
    """A new virtualenv (no pip) whose site-packages links the given distributions."""
    venv.EnvBuilder(with_pip=False).create(root)
    site = next((root / "lib").glob("python*/site-packages"))
    for dist in dists.values():
        for entry in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            target = Path(dist.locate_file(entry))
            if target.exists() and not (site / entry).exists():
                (site / entry).symlink_to(target)
    return root / "bin" / "python"


def install(python: Path, wheel: Path, spec: str = "") -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            f"{wheel}{spec}",
        ],
        check=True,
        capture_output=True,
    )


def run(python: Path, code: str, cwd: Path) -> str:
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def declared(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def test_the_core_wheel_needs_torch_alone(wheel: Path, tmp_path: Path) -> None:
    core = [r for r in declared(wheel) if not Requirement(r).marker]
    assert [Requirement(r).name for r in core] == ["torch"]
    python = fresh_env(tmp_path / "env", _closure(core))
    install(python, wheel)
    out = run(
        python,
        """
import math, sys, torch
from isodiff import Regulariser, isometry_loss
torch.manual_seed(0)
f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Tanh())
x = torch.randn(4, 3, 2, 2)
loss = float(isometry_loss(f, x, metric="euclidean"))
print(math.isfinite(loss) and loss > 0)
try:
    import isodiff.train.command
except ModuleNotFoundError as err:
    print("suite absent:", err.name)
print(sorted({m.split('.')[0] for m in sys.modules} & set(SUITE_ONLY)))
""".replace("SUITE_ONLY", repr(SUITE_ONLY)),
        tmp_path,
    )
    lines = out.split("\n")
    assert lines[0] == "True"  # the loss runs (a one-probe estimate: no bound holds per draw)
    assert lines[1].startswith("suite absent:")
    assert lines[-2] == "[]"


def test_without_the_suite_a_console_command_says_how_to_install_it(
    wheel: Path, tmp_path: Path
) -> None:
    """The core wheel installs the console commands too (a wheel cannot make them depend on
    an extra): each says in one line how to get the suite, before it imports anything, so
    in a bare environment (not even torch); so do the `python -m` forms."""
    python = fresh_env(tmp_path / "env", {})
    install(python, wheel)
    with zipfile.ZipFile(wheel) as zf:
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        commands = re.findall(r"^(isodiff-[\w-]+) =", zf.read(entry_points).decode(), re.M)
    assert len(commands) == 11
    for command in commands:
        done = subprocess.run(
            [str(python.parent / command), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert (done.returncode, done.stdout) == (2, ""), (command, done.stderr[-2000:])
        assert done.stderr == (
            f"{command} needs the experiment suite, which is not installed: "
            "pip install 'isodiff[suite]'\n"
        )
    for package in ("train", "evaluate", "sweep"):  # the README's `python -m` forms
        done = subprocess.run(
            [str(python), "-m", f"isodiff.{package}", "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert (done.returncode, done.stdout) == (2, ""), (package, done.stderr[-2000:])
        assert done.stderr == (
            f"python -m isodiff.{package} needs the experiment suite, which is not "
            "installed: pip install 'isodiff[suite]'\n"
        )


def test_the_suite_wheel_trains_from_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    python = fresh_env(tmp_path / "env", _closure(declared(wheel), ("suite",)))
    install(python, wheel, "[suite]")
    bin_dir = python.parent
    where = run(
        python,
        "import isodiff.config as c, isodiff.sweep.specs as s; print(c.CONF); print(s.EXPERIMENTS)",
        tmp_path,
    ).split()
    assert all(Path(p).is_relative_to(tmp_path / "env") for p in where), where
    train = subprocess.run(
        [
            str(bin_dir / "isodiff-train"),
            "tier=smoke",
            f"run_root={tmp_path / 'runs'}",
            "train.progress=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    statuses = list((tmp_path / "runs" / "smoke").glob("*/*/status.json"))
    assert len(statuses) == 1 and '"done"' in statuses[0].read_text()
    # each console command answers --help: Hydra's lists the groups of the shipped conf/
    expected = {
        "isodiff-evaluate": "eval: base, paper, quick, smoke",
        "isodiff-sweep": "python -m isodiff.sweep",
        "isodiff-tables": "python -m isodiff.analysis.tables",
    }
    for command, text in expected.items():
        done = subprocess.run(
            [str(bin_dir / command), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0 and text in done.stdout, (command, done.stderr[-500:])
