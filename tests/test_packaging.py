"""A regular (non-editable) install works: the wheel carries the task data, the shipped checkpoints and the
training configs, and the installed code finds them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    pytest.importorskip("setuptools.command.bdist_wheel", reason="setuptools >= 70.1 builds wheels offline")
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy of the files git knows (tracked or new, not ignored): no build/, *.egg-info or venv, from
    # which setuptools would otherwise take files listed by earlier builds
    src = tmp / "src"
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        for name in listed:
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
    else:
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "runs", "wandb", ".venv",
                                                                 "__pycache__", ".pytest_cache", "*.h5"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp),
                    str(src)], check=True, cwd=tmp, capture_output=True)
    wheel = next(tmp.glob("headprobe-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return site, zipfile.ZipFile(wheel).namelist()


def test_wheel_carries_every_shipped_file(installed):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the shipped files")
    _, names = installed
    for folder in ("datasets", "checkpoints", "train/configs"):
        files = [f for f in _tracked(folder) if not f.endswith(".py")]
        assert files, folder
        missing = [f for f in files if f"headprobe/{f}" not in names]
        assert not missing, missing


def test_wheel_installs_only_the_headprobe_namespace(installed):
    """Every top-level import name of the wheel starts with headprobe: no `train`, `probes`, `extract` or
    `datasets` (which would shadow Hugging Face's library) beside other distributions' packages."""
    site, names = installed
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"headprobe"}, top
    listed = next(site.glob("headprobe-*.dist-info"))
    if (listed / "top_level.txt").exists():
        assert (listed / "top_level.txt").read_text().split() == ["headprobe"]


def test_installed_code_finds_tasks_checkpoints_and_configs(installed, tmp_path):
    site, _ = installed
    script = (
        "import json, headprobe\n"
        "from headprobe.extract.tasks import TASKS, get_task\n"
        "from headprobe.train.fit import CONFIGS\n"
        "load = headprobe.load\n"
        "print(json.dumps({'extract': headprobe.__file__,\n"
        "                  'examples': {n: len(get_task(n).examples(0)) for n in TASKS},\n"
        "                  'probe': type(load('v1/capitals-linear')).__name__,\n"
        "                  'configs': sorted(p.name for p in CONFIGS.glob('*.yaml'))}))\n")
    env = {k: v for k, v in os.environ.items() if k != "HEADPROBE_REGISTRY"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert Path(got["extract"]).is_relative_to(site)  # the installed copy, not the checkout
    assert all(n > 0 for n in got["examples"].values()), got["examples"]
    assert got["probe"] == "LinearProbes"
    assert {"linear.yaml", "sparse.yaml", "sae.yaml"} <= set(got["configs"])


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly (the root maps to `headprobe`): a new subpackage must be added."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"headprobe." + ".".join(p.parent.relative_to(ROOT).parts)
             for d in ("extract", "probes", "train") for p in (ROOT / d).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
