"""The built wheel is self-contained: grammar, passes and the policy stdlib live inside `policyc`.

Builds the wheel from a clean copy of the source tree, installs it (with its dependencies) into a
fresh virtual environment, and runs the installed `policyc check` on an installed stdlib policy.
Needs the package index (or pip's cache) for the build backend and the runtime dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB_POLICY = "fastv.tokpol"
# Never copied into the build tree: VCS data, virtual environments, build outputs and caches.
_SKIP = {
    ".git",
    ".venv",
    ".ci-venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "tests",
    "shared",
}
_GUARD = 600  # seconds; a hang guard for subprocesses, not a performance assertion


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Skip caches, build outputs and any virtual environment (a folder holding pyvenv.cfg)."""
    return {n for n in names if n in _SKIP or n.endswith(".egg-info") or (Path(folder, n) / "pyvenv.cfg").exists()}


def _run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=_GUARD, check=False
    )


def _child_env() -> dict[str, str]:
    """The environment without anything that would point a child Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of the repository (no stale build/ outputs can leak in)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=_ignore)
    result = _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", source], cwd=root, env=_child_env()
    )
    assert result.returncode == 0, f"building the wheel failed:\n{result.stdout}\n{result.stderr}"
    wheels = list((root / "dist").glob("policyc-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the wheel and its dependencies installed."""
    root = tmp_path_factory.mktemp("venv")
    result = _run([sys.executable, "-m", "venv", root / "env"], cwd=root, env=_child_env())
    assert result.returncode == 0, result.stderr
    python = _bin(root / "env", "python")
    # torch first, as the README says: a bare torch requirement would fetch a multi-GB CUDA build.
    torch = _run([python, "-m", "pip", "install", "--quiet", "torch==2.13.0"], cwd=root, env=_child_env())
    assert torch.returncode == 0, f"installing torch failed:\n{torch.stdout}\n{torch.stderr}"
    result = _run([python, "-m", "pip", "install", "--quiet", wheel], cwd=root, env=_child_env())
    assert result.returncode == 0, f"installing the wheel failed:\n{result.stdout}\n{result.stderr}"
    return root / "env"


def _bin(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


def _installed_policy(venv: Path) -> Path:
    """The stdlib policy as installed in `venv`, located through that environment's importlib.resources."""
    script = f"import importlib.resources as r, sys; print(r.files('policyc.policies').joinpath({STDLIB_POLICY!r}))"
    result = _run([_bin(venv, "python"), "-c", script], cwd=venv.parent, env=_child_env())
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_file(), f"{STDLIB_POLICY} is not installed: {path}"
    assert venv.resolve() in path.resolve().parents, f"{path} is not inside the fresh environment {venv}"
    return path


def test_wheel_maps_top_level_folders_into_the_package(wheel: Path) -> None:
    """grammar/, passes/ and policies/ ship as policyc.grammar, policyc.passes and policyc.policies only."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "policyc/grammar/tokpol.lark" in names
    assert "policyc/passes/__init__.py" in names
    for shipped in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert f"policyc/data/vqa/{shipped}" in names  # the trained default model
    policies = {n for n in names if n.startswith("policyc/policies/") and n.endswith(".tokpol")}
    assert policies, "the wheel ships no stdlib policies"
    assert f"policyc/policies/{STDLIB_POLICY}" in names
    for shipped in ("policyc_synthetic.yaml", "policyc_synthetic_val.yaml", "utils.py", "test.jsonl",
                    "validation.jsonl"):  # the lmms-eval tasks
        assert f"policyc/integrations/lmms_eval/tasks/policyc_synthetic/{shipped}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "policyc = policyc.integrations.lmms_eval.manifest:manifests" in \
        zipfile.ZipFile(wheel).read(entry_points).decode()
    top_level = {n.split("/", 1)[0] for n in names}
    assert not top_level & {"grammar", "passes", "policies", "tests"}, sorted(top_level)
    assert all(t == "policyc" or t.startswith("policyc-") for t in top_level), sorted(top_level)


def test_installed_console_script_checks_a_stdlib_policy(venv: Path) -> None:
    """The `policyc` console script from the wheel accepts an installed stdlib policy."""
    policy = _installed_policy(venv)
    result = _run([_bin(venv, "policyc"), "check", policy], cwd=venv.parent, env=_child_env())
    assert result.returncode == 0, f"policyc check failed:\n{result.stdout}\n{result.stderr}"


def test_check_does_not_import_transformers(venv: Path, tmp_path: Path) -> None:
    """`policyc check` runs in-process without importing transformers (it reads the operators' declarations,
    which live beside their torch code, so torch is imported; no model library is).

    A stub `transformers` package is put on the path first, so that any import of it (guarded or not) would land in
    `sys.modules` as the stub.
    """
    stub = tmp_path / "stub"
    (stub / "transformers").mkdir(parents=True)
    (stub / "transformers" / "__init__.py").write_text("STUB = True\n", encoding="utf-8")
    policy = _installed_policy(venv)
    script = "\n".join(
        [
            "import json, sys",
            "from click.testing import CliRunner",
            "import policyc.cli",
            f"result = CliRunner().invoke(policyc.cli.main, ['check', {str(policy)!r}])",
            "print(json.dumps({'exit_code': result.exit_code, 'output': result.output,",
            "                  'exception': repr(result.exception) if result.exception else None,",
            "                  'cli_file': policyc.cli.__file__, 'transformers': 'transformers' in sys.modules}))",
        ]
    )
    env = _child_env()
    env["PYTHONPATH"] = str(stub)
    result = _run([_bin(venv, "python"), "-c", script], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert venv.resolve() in Path(report["cli_file"]).resolve().parents, report["cli_file"]
    assert report["exit_code"] == 0, report
    assert report["transformers"] is False, "policyc check imported transformers"
