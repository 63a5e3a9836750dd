"""A wheel built from the source tree, installed into a fresh venv, works from an empty folder: the presets
travel with the package, --version comes from the installed metadata, and a short train, evaluate and report
succeed.

Offline: the wheel is built with the current setuptools (no build isolation), and the new venv sees the
already installed dependencies (torch, numpy, ...) through a .pth file instead of installing them again."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "cifarcnn" / "presets").glob("*.yaml"))
DEPENDENCIES = ("torch", "numpy", "yaml", "tqdm", "tensorboard", "matplotlib", "PIL")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run `cmd`; fail the test with its output unless it exits 0. Returns its stdout."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(map(str, cmd))} exited {done.returncode}\n"
                                  f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
    return done.stdout


def build_wheel(tmp: Path) -> Path:
    """Copy pyproject.toml, README.md and cifarcnn/ to `tmp`/src and build a wheel from that copy."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "cifarcnn", src / "cifarcnn", ignore=shutil.ignore_patterns("__pycache__"))
    run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    wheels = list((tmp / "dist").glob("cifarcnn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def dependency_dirs() -> list[str]:
    """The folders the dependencies are imported from here (site-packages), for the new venv's .pth file."""
    dirs = []
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed"
        origin = Path(spec.origin)
        folder = str(origin.parent.parent if spec.submodule_search_locations else origin.parent)
        if folder not in dirs:
            dirs.append(folder)
    return dirs


def install_into_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A venv without pip, the wheel installed into it by this pip, the dependencies visible through a .pth
    file of plain paths (so the editable cifarcnn of this environment cannot leak in). Returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    run([*PIP, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=venv.parent)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       cwd=venv).strip())
    (purelib / "cifarcnn_test_dependencies.pth").write_text("".join(f"{d}\n" for d in dependency_dirs()))
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> SimpleNamespace:
    """The wheel, the new venv's `cifarcnn` script, an empty working folder and an environment without
    PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("install")
    wheel = build_wheel(tmp)
    python = install_into_fresh_venv(wheel, tmp / "venv")
    work = tmp / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return SimpleNamespace(wheel=wheel, venv=tmp / "venv", python=python,
                           cli=tmp / "venv" / "bin" / "cifarcnn", work=work, env=env)


def cifarcnn(installed: SimpleNamespace, *args: str) -> str:
    return run([installed.cli, *args], cwd=installed.work, env=installed.env)


def test_the_wheel_ships_every_preset_and_the_venv_imports_its_own_copy(installed):
    assert PRESETS and "seed" in PRESETS and "fast" in PRESETS
    shipped = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {f"cifarcnn/presets/{name}.yaml" for name in PRESETS} <= shipped
    where = run([installed.python, "-c", "import cifarcnn, torch; print(cifarcnn.__file__)"],
                cwd=installed.work, env=installed.env).strip()
    assert Path(where).resolve().is_relative_to(installed.venv.resolve()), where


def pyproject_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the `version = "X.Y.Z"` line of [project]
        project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
        return next(line.split('"')[1] for line in project.splitlines() if line.startswith("version ="))
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_the_installed_metadata(installed):
    version = pyproject_version()
    assert cifarcnn(installed, "--version").strip() == f"cifarcnn {version}"


def test_presets_lists_every_packaged_preset_with_its_description(installed):
    lines = cifarcnn(installed, "presets").splitlines()
    assert [line.split()[0] for line in lines] == PRESETS
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a description after each name


def test_check_runs_the_default_and_every_preset(installed):
    out = cifarcnn(installed, "check")
    assert "model:      simple_cnn" in out and "every trainable parameter received a gradient" in out
    for name in PRESETS:
        model = yaml.safe_load((ROOT / "cifarcnn" / "presets" / f"{name}.yaml").read_text())["model"]
        assert f"model:      {model}\n" in cifarcnn(installed, "check", "--preset", name)


def test_train_evaluate_and_report_from_an_empty_folder(installed, cifar_root):
    data = ["--data-dir", str(cifar_root), "--device", "cpu"]
    cifarcnn(installed, "train", "--preset", "fast", "epochs=1", "batch_size=256", "eval_batch_size=100",
             "data.val_size=100", "--runs-dir", "runs", "--name", "r", *data)
    run_dir = installed.work / "runs" / "r"
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == "fastnet"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    cifarcnn(installed, "evaluate", str(run_dir), *data)
    metrics = json.loads((run_dir / "eval" / "test_metrics.json").read_text())
    assert metrics["num_images"] == 200 and metrics["tta"] == 2
    assert "wrote" in cifarcnn(installed, "report", str(run_dir), *data)
    assert "fastnet" in (run_dir / "report.html").read_text()
