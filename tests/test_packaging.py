"""The release: the wheel holds every module and config file of the source tree and works
installed on its own, and every third-party module ngexp imports is a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.helpers import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]


def requirement_name(requirement: str) -> str:
    """``'hydra-core>=1.3'`` -> ``'hydra-core'`` (normalized as PEP 503 does)."""
    name = re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, bool]:
    """Top-level module name -> whether some module of ngexp imports it at module level (the
    others are imported inside a function: optional features such as the MLflow logger)."""
    found: dict[str, bool] = {}
    for path in (REPO / "ngexp").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "ngexp" and top not in sys.stdlib_module_names:
                    found[top] = found.get(top, False) or id(node) in top_level
    return found


def test_every_imported_module_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = {requirement_name(r) for r in project["dependencies"]}
    optional = {requirement_name(r) for extra in project["optional-dependencies"].values()
                for r in extra}
    distributions = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"torch", "numpy", "yaml", "hydra"} <= set(imports)
    for module, at_module_level in sorted(imports.items()):
        names = {requirement_name(d) for d in distributions.get(module, [])}
        assert names, f"{module} is imported by ngexp but not installed"
        declared = required if at_module_level else required | optional
        assert names & declared, (f"ngexp imports {module} (from {sorted(names)}) but "
                                  f"pyproject.toml does not declare it"
                                  + ("" if at_module_level else " (not even as an extra)"))


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the source tree (the checkout stays clean), offline."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("ngexp", "conf"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, text=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("ngexp-*.whl")
    return wheel


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "ngexp").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    configs = {"ngexp/conf/" + p.relative_to(REPO / "conf").as_posix()
               for p in (REPO / "conf").rglob("*.yaml")}
    missing = sorted((sources | configs) - shipped)
    assert not missing, f"missing from the wheel: {missing}"

    # A fresh virtual environment with only the wheel installed; the third-party packages come
    # from this interpreter's site-packages through a .pth path line (which, unlike the
    # site-packages themselves, does not run their .pth files: no editable ngexp leaks in).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env={"PATH": os.environ["PATH"]},
    ).stdout.strip())
    (site_packages / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=120)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NO_COLOR": "1",
           "COLUMNS": "200",  # no PYTHONPATH: the source tree is not importable
           # the example plugin's entry point is visible through deps.pth, its module is not
           "NGEXP_DISABLE_PLUGIN_AUTOLOAD": "1"}

    def ngexp(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(venv / "bin" / "ngexp"), *args], cwd=work, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"ngexp {args}: {result.stdout}\n{result.stderr}"
        return result

    where = subprocess.run([str(python), "-c", "import ngexp; print(ngexp.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    ngexp("train", "data=synthetic", "trainer.max_steps=3", "trainer.log_every=1",
          "trainer.progress=plain", "output_root=runs")
    (summary,) = (work / "runs").rglob("summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
    report = ngexp("report", "runs")
    assert (work / "runs" / "report" / "report.md").is_file(), report.stdout
