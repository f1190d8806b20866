"""``pip install hyperadam`` with no extras is the runtime alone: built into a fresh venv.

The project is copied, built and installed by pip into a new virtual environment (from the
package index this machine uses; pip's cache keeps it quick). Then, in that venv and outside the
source tree: only numpy and onnxruntime (and what they need) are installed, the README's numpy
example runs, ``runtime.load("models:/…")`` says it needs mlflow, and the ``hyperadam`` command
says in one line that it needs the ``train`` extra.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "runtime", "meta_train", "export")
TRAINING_STACK = ("torch", "ray", "mlflow", "onnx", "onnxscript", "matplotlib", "jax", "optax")

# Run inside the venv: the direct requirements of hyperadam without extras, their closure and
# every installed distribution (names normalised as in PEP 503).
PROBE = """
import importlib.metadata as md, json, re
from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def requires(dist):
    names = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(norm(req.name))
    return names

direct = requires("hyperadam")
closure, todo = set(), list(direct)
while todo:
    name = todo.pop()
    if name not in closure:
        closure.add(name)
        todo += requires(name)
installed = {norm(d.metadata["Name"]) for d in md.distributions()}
print(json.dumps({"direct": direct, "closure": sorted(closure), "installed": sorted(installed)}))
"""


def readme_numpy_example() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.split("**numpy**", 1)[1]
    return re.search(r"```python\n(.*?)```", after, flags=re.DOTALL).group(1)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """A fresh venv with ``pip install <copy of the project>`` (no extras)."""
    root = tmp_path_factory.mktemp("runtime-only")
    source = root / "hyperadam"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build", "*.egg-info")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=root,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python, env, root


def run_in(venv: tuple[Path, dict[str, str], Path], code: str) -> subprocess.CompletedProcess:
    python, env, cwd = venv
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_no_extras_installs_numpy_and_onnxruntime_and_nothing_else(runtime_venv):
    probe = run_in(runtime_venv, PROBE)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert sorted(found["direct"]) in (["numpy", "onnxruntime"], ["numpy", "onnxruntime-gpu"])
    # Everything installed is hyperadam, the venv's own tools, or what numpy/onnxruntime need.
    extra = set(found["installed"]) - set(found["closure"]) - {"hyperadam", "pip", "setuptools"}
    assert not extra, f"installed beyond the runtime's requirements: {sorted(extra)}"
    absent = run_in(
        runtime_venv,
        "import importlib.util as u; "
        f"print([m for m in {TRAINING_STACK!r} if u.find_spec(m) is not None])",
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr


def test_the_readme_numpy_example_runs_from_the_installed_package(runtime_venv):
    code = textwrap.dedent(
        """
        import numpy as np
        rng = np.random.default_rng(0)
        shapes = ((4, 3), (3,), (3, 2), (2,))
        w1, b1, w2, b2 = (rng.normal(size=s).astype(np.float32) for s in shapes)
        g_w1, g_b1, g_w2, g_b2 = (rng.normal(size=s).astype(np.float32) for s in shapes)
        before = [a.copy() for a in (w1, b1, w2, b2)]
        """
    )
    code += readme_numpy_example()
    code += textwrap.dedent(
        """
        import sys
        assert "site-packages" in runtime.__file__, runtime.__file__
        changed = [not np.array_equal(a, b) for a, b in zip((w1, b1, w2, b2), before)]
        assert all(changed) and all(np.isfinite(a).all() for a in (w1, b1, w2, b2)), changed
        stepper.step([g_w1, g_b1, g_w2, g_b2])  # the restored state steps on
        forbidden = ("torch", "ray", "mlflow", "onnx", "jax", "meta_train", "export")
        print(sorted(m for m in forbidden if m in sys.modules))
        """
    )
    result = run_in(runtime_venv, code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_mlflow_uri_says_that_it_needs_mlflow(runtime_venv):
    code = textwrap.dedent(
        """
        import runtime
        try:
            runtime.load("models:/hyperadam@champion")
        except ImportError as error:
            print(type(error).__name__, error)
        else:
            print("loaded")
        """
    )
    result = run_in(runtime_venv, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "ImportError loading 'models:/hyperadam@champion' needs mlflow (pip install mlflow); "
        "a local exported folder does not"
    )


def test_the_hyperadam_command_names_the_missing_train_extra(runtime_venv):
    python, env, cwd = runtime_venv
    result = subprocess.run(
        [str(python.parent / "hyperadam"), "evaluate", "--task", "mnist-nn-sigmoid-100"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "hyperadam: error: the hyperadam command needs the training extra (torch, ray, mlflow, "
        "onnx, onnxscript, matplotlib not installed): pip install 'hyperadam[train]'\n"
    )
