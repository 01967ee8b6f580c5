"""The project files users start from: environment.yml, pyproject, the Makefile's commands."""

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_installs_python_pip_and_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(str(d).startswith("python") for d in deps)
    assert "pip" in deps
    pip_block = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e .[dev]" in pip_block


def test_pyproject_gives_lower_bounds_only_for_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        spec = next(d for d in deps if d.split(">")[0].split("=")[0].strip() == name)
        assert ">=" in spec and "==" not in spec and "<" not in spec, spec


def test_readme_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make reproduce" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
