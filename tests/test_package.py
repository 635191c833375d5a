"""The package as a whole: the library stands apart from its apps, and a built wheel works
without the checkout (LICENSE, py.typed, one version, the console script)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import batchnorm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "batchnorm"
# What only the apps (batchnorm.apps) may use.
APP_ONLY = {"argparse", "matplotlib", "tqdm", "sklearn", "torch", "subprocess"}


def _library_modules() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    return [f for f in files if "apps" not in f.relative_to(PACKAGE).parts]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# Modules whose whole purpose is to start the command (python -m batchnorm, the old console
# script's target): they import batchnorm.apps.cli and nothing else.
ENTRY_POINTS = {"batchnorm.__main__", "batchnorm.cli"}


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported_names(path: Path, package: str) -> set[str]:
    """Every module an import statement of `path` names, anywhere in the file (also inside
    functions), resolved to absolute names (relative imports from `package`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_the_library_modules_are_found():
    names = {_module_name(p) for p in _library_modules()}
    assert {"batchnorm", "batchnorm.layers", "batchnorm.functional", "batchnorm.distributed",
            "batchnorm.gradcheck", "batchnorm.nn", "batchnorm.nn.losses"} <= names
    assert not any(n.startswith("batchnorm.apps") for n in names)


@pytest.mark.parametrize("path", _library_modules(), ids=_module_name)
def test_library_module_imports_no_app_dependency(path):
    names = _imported_names(path, _package_of(path))
    bad = sorted(n for n in names if n.split(".")[0] in APP_ONLY)
    assert not bad, f"{_module_name(path)} imports {bad}"
    if _module_name(path) not in ENTRY_POINTS:
        apps = sorted(n for n in names if n.startswith("batchnorm.apps"))
        assert not apps, f"{_module_name(path)} imports {apps}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    import subprocess\n    from matplotlib import pyplot\n"
                 "    from ..apps import demo\n")
    names = _imported_names(f, "batchnorm.nn")
    assert {"subprocess", "matplotlib", "matplotlib.pyplot", "batchnorm.apps.demo"} <= names


_PROBE = r"""
import importlib, json, sys
# Without numba and mpi4py (which themselves import subprocess), so that what is left is ours.
sys.modules["numba"] = None
sys.modules["mpi4py"] = None
import numpy
before = set(sys.modules)
name = sys.argv[1]
try:
    importlib.import_module(name)
except ImportError as err:
    print(json.dumps({"skipped": str(err)}))
    raise SystemExit(0)
new = set(sys.modules) - before
print(json.dumps({"loaded": sorted(m for m in new if m.split(".")[0] in json.loads(sys.argv[2]))}))
"""


@pytest.mark.parametrize(
    "name", [_module_name(p) for p in _library_modules() if _module_name(p) not in ENTRY_POINTS]
)
def test_importing_a_library_module_loads_no_app_dependency(name):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, name, json.dumps(sorted(APP_ONLY))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" in out:
        assert name == "batchnorm._numba", out  # needs numba, which the probe hides
    else:
        assert out["loaded"] == [], f"importing {name} loaded {out['loaded']}"


def test_python_dash_m_batchnorm_runs_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "info", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["versions"]["batchnorm"] == batchnorm.__version__
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "nope"], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr


def test_the_old_cli_module_still_dispatches():
    from batchnorm.apps.cli import main as new_main
    from batchnorm.cli import main

    assert main is new_main


# ---------------------------------------------------------------------------------------------
# the wheel, installed without the checkout (about a minute: marked `wheel`)


def _wheel_env() -> dict[str, str]:
    # Nothing of the checkout may leak in: no PYTHONPATH, no user site.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """Build a wheel from the repository and install it (no dependencies, not editable) into a
    fresh virtual environment that sees this interpreter's packages (numpy, matplotlib, ...)
    but not the checkout."""
    pytest.importorskip("hatchling")
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(dist), str(ROOT)],
        capture_output=True, text=True, env=_wheel_env(), timeout=600, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("batchnorm-*.whl")
    # The new environment must see the packages of the environment running the tests, which is
    # a virtual environment itself: a .pth file adds its site-packages (system site packages
    # would only reach the base interpreter's).
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    py = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True,
                             env=_wheel_env()).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(purelib, "_outer_site.pth").write_text("\n".join(ours) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
         "--no-index", "--force-reinstall", str(wheel)],
        capture_output=True, text=True, env=_wheel_env(), timeout=600, cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"wheel": wheel, "python": py, "tmp": tmp}


@pytest.mark.wheel
def test_wheel_carries_license_and_py_typed(installed_wheel):
    with zipfile.ZipFile(installed_wheel["wheel"]) as z:
        names = z.namelist()
        assert "batchnorm/py.typed" in names
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licenses, names
        text = z.read(licenses[0]).decode()
        assert "MIT License" in text and "the batchnorm authors" in text
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {batchnorm.__version__}\n" in meta
    assert "License-Expression: MIT" in meta or "License: MIT" in meta
    assert not any(n.startswith(("tests/", "src/")) for n in names)


@pytest.mark.wheel
def test_installed_wheel_imports_from_the_environment_not_the_checkout(installed_wheel):
    code = (
        "import json, importlib.metadata as md, batchnorm, batchnorm.nn, batchnorm.apps, "
        "batchnorm.gradcheck, batchnorm.distributed, batchnorm.apps.demo\n"
        "from batchnorm import BatchNorm, BatchNormalization\n"
        "from batchnorm.gradcheck import numerical_gradient, relative_error\n"
        "print(json.dumps({'file': batchnorm.__file__, 'version': batchnorm.__version__,"
        " 'metadata': md.version('batchnorm')}))\n"
    )
    elsewhere = installed_wheel["tmp"]
    proc = subprocess.run([str(installed_wheel["python"]), "-c", code], capture_output=True,
                          text=True, env=_wheel_env(), timeout=120, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(Path(installed_wheel["python"]).parents[1])
    assert not Path(got["file"]).resolve().is_relative_to(ROOT)
    assert got["version"] == got["metadata"] == batchnorm.__version__


@pytest.mark.wheel
def test_installed_console_script_runs_the_quick_demo(installed_wheel):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    bindir = Path(installed_wheel["python"]).parent
    script = bindir / ("batchnorm.exe" if os.name == "nt" else "batchnorm")
    assert script.exists()
    out = installed_wheel["tmp"] / "demo-out"
    proc = subprocess.run(
        [str(script), "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=_wheel_env(), timeout=600, cwd=installed_wheel["tmp"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with batch norm" in proc.stdout
    assert len(json.loads((out / "results.json").read_text())["weight_scale"]) == 4
    proc = subprocess.run([str(installed_wheel["python"]), "-m", "batchnorm", "info", "--json"],
                          capture_output=True, text=True, env=_wheel_env(), timeout=120,
                          cwd=installed_wheel["tmp"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["versions"]["batchnorm"] == batchnorm.__version__


def test_version_has_one_source():
    """pyproject.toml takes the version from batchnorm/__init__.py (hatch's dynamic version)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    path = config["tool"]["hatch"]["version"]["path"]
    assert (ROOT / path).resolve() == (PACKAGE / "__init__.py").resolve()
