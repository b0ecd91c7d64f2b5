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
    for folder, package in (("datasets", "headprobe_datasets"), ("checkpoints", "headprobe_checkpoints")):
        files = _tracked(folder)
        assert files, folder
        missing = [f for f in files if package + f[len(folder):] not in names]
        assert not missing, missing
    assert {f for f in _tracked("train/configs")} <= set(names)
    assert not any(n.startswith(("datasets/", "checkpoints/")) for n in names)  # never a package named datasets


def test_installed_code_finds_tasks_checkpoints_and_configs(installed, tmp_path):
    site, _ = installed
    script = (
        "import json, extract, probes\n"
        "from extract.tasks import TASKS, get_task\n"
        "from probes.hub import load\n"
        "from train.fit import CONFIGS\n"
        "print(json.dumps({'extract': extract.__file__, 'examples': {n: len(get_task(n).examples(0)) for n in TASKS},\n"
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
