"""The README's Python example runs as written, on the real default model and a shipped checkpoint."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_readme_images_and_links_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(((?:docs|bench|checkpoints|datasets)/[^)\s#]+)\)", text)
    assert "docs/default-run/img/stage_map.png" in targets
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, f"README points at missing files: {missing}"
