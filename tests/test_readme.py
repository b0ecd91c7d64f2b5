"""The README's examples run as written, on the real default model: its Python block (with a shipped checkpoint)
and its quick-run command (whose report folder must hold the page, the Markdown, every image it shows and per-head
tables that parse)."""
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_lines(text: str) -> list[str]:
    """The lines of the README's ```bash blocks."""
    return [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]


def quick_run_command(text: str) -> list[str]:
    """The argv of the README's one quick-run command (the bash line with `headprobe run --quick`)."""
    lines = [line for line in bash_lines(text) if "headprobe run --quick" in line]
    assert len(lines) == 1, f"the README has one quick-run command in a bash block, found {lines}"
    argv = shlex.split(lines[0])
    assert argv[:3] == ["headprobe", "run", "--quick"], lines[0]
    return argv


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    heads = re.findall(r"\('L(\d+)\.H(\d)', ([\d.]+)\)", printed)
    assert len(heads) == 5, printed
    assert all(float(acc) >= 0.9 for _, _, acc in heads), printed  # capitals is decodable from its best heads
    assert (tmp_path / "capitals.h5").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_quick_run_writes_a_whole_report(tmp_path):
    """The quick-run command as written, in an empty folder (it writes runs/quick there), with `headprobe` being
    the console script's function in this interpreter."""
    argv = quick_run_command(README.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", "from headprobe.train.cli import main; main()", *argv[1:]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = (tmp_path / "runs" / "quick" / "report").resolve()
    assert f"report: {report / 'index.html'}" in done.stdout
    check_report(report, tasks={"capitals", "ioi", "greater_than", "sentiment"})  # train/configs/run_quick.yaml


def check_report(report: Path, tasks: set[str]) -> None:
    """A report folder holds its page and Markdown, every image they show as a PNG, and per-head tables (every head
    of the default model) for the stage map, the training-free scores and each task, in CSV and JSON that parse."""
    markdown = (report / "report.md").read_text()
    page = (report / "index.html").read_text()
    assert markdown.startswith("# headprobe report") and "<img" in page

    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+)\)", markdown)
    assert "img/stage_map.png" in images and "img/ablation.png" in images, images
    for image in images:
        assert (report / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert f'src="{image}"' in page, image

    tables = re.findall(r"\]\((data/[^)]+\.(?:csv|json))\)", markdown)
    names = ("stage_map", "scores", *(f"heads_{task}" for task in tasks))
    expected = {f"data/{name}.{ext}" for name in names for ext in ("csv", "json")}
    assert set(tables) == expected and {f"data/{p.name}" for p in (report / "data").iterdir()} == expected
    for table in tables:
        text = (report / table).read_text()
        if table.endswith(".json"):
            rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"{table}: {c} is not JSON"))
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        assert {"layer", "head", "stage"} <= set(rows[0]), table
        heads = sorted((int(r["layer"]), int(r["head"])) for r in rows)
        assert heads == [(layer, head) for layer in range(30) for head in range(9)], table  # every head, once
    stages = {r["stage"] for r in csv.DictReader(io.StringIO((report / "data" / "stage_map.csv").read_text()))}
    assert stages - {""} and stages <= {"", "KR", "ICI", "LR", "EP"}, stages


def test_readme_quick_run_command_is_found():
    assert quick_run_command(README.read_text()) == ["headprobe", "run", "--quick"]


def test_readme_images_and_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(((?:docs|bench|checkpoints|datasets)/[^)\s#]+)(?:#[^)]*)?\)", text)
    assert "docs/default-run/img/stage_map.png" in targets
    assert {"docs/results.md", "docs/benchmarks.md", "docs/run-folder.md", "docs/architecture.md"} <= set(targets)
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, f"README points at missing files: {missing}"


def test_readme_stays_a_front_page():
    assert len(README.read_bytes()) <= 8192, "the README is a five-minute read (at most 8 KiB): move details to docs/"
