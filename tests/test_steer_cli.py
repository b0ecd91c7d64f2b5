"""`headprobe steer` on a tiny model: the sweep's files, the saved intervention, and bad inputs refused in one line
with nothing written."""
from __future__ import annotations

import json
import re

import lightning as L
import numpy as np
import pytest
import torch

from headprobe import probes
from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.models import load_model
from headprobe.extract.tasks import TASKS
from headprobe.probes.checkpoint import save_checkpoint
from headprobe.probes.linear import LinearProbes
from headprobe.train.cli import main
from headprobe.train.data import StoreDataModule
from helpers import make_checkpoint, save_model_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama folder, its sentiment store (60 examples) and a LinearProbes checkpoint trained on it, plus a
    capitals store of the same model and a tiny GPT-2 folder."""
    folder = tmp_path_factory.mktemp("steer_cli")
    model = save_model_folder(folder / "llama", "llama")
    loaded = load_model(model)
    cfg = ExtractConfig(max_examples=60)
    store = extract(loaded, TASKS["sentiment"], folder / "sentiment.h5", cfg, progress=False)
    other = extract(loaded, TASKS["capitals"], folder / "capitals.h5", ExtractConfig(max_examples=20), progress=False)
    module = LinearProbes(controls=["shuffled"])
    L.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=StoreDataModule(str(store)))
    probe = save_checkpoint(folder / "probe", module.checkpoint_tensors(), module.checkpoint_config(),
                            module.checkpoint_metrics())
    return {"model": model, "store": store, "other": other, "probe": probe, "folder": folder,
            "gpt2": save_model_folder(folder / "gpt2", "gpt2")}


def _argv(t: dict, out, *extra: str) -> list[str]:
    return ["steer", "--probe", str(t["probe"]), "--store", str(t["store"]), "--out", str(out), "--model", t["model"],
            "--k", "2", "--alphas", "0", "1", "--draws", "2", "--examples", "8", "--corpus-tokens", "64", *extra]


def test_headprobe_steer_writes_the_sweep_and_saves_the_intervention(trained, tmp_path, capsys):
    from headprobe.probes.checks.steer import SteerResult
    from headprobe.probes.steering import Intervention

    out = tmp_path / "out"
    main(_argv(trained, out, "--k", "2", "3", "--save", str(out / "iv"), "--alpha", "2"))
    printed = capsys.readouterr().out
    assert "steer: sentiment K=3 alpha=2:" in printed and "saved the intervention (K=2, alpha=2)" in printed
    result = SteerResult.from_dict(json.loads((out / "steer.json").read_text())["sentiment"])
    assert result.ks == [2, 3] and result.alphas == [0.0, 1.0, 2.0] and len(result.rows) == 2 * 3 * (1 + 2 * 2)
    assert result.n_examples == 8 and 64 <= result.n_tokens < 64 + 128
    assert set(result.metrics) == {"margin", "share_label1"}
    csv = (out / "steer.csv").read_text().splitlines()
    assert csv[0].startswith("task,metric,k,alpha,condition,draw,value,change") and len(csv) == 1 + 2 * 30
    assert "| sentiment | margin | 3 | 2 |" in (out / "steer.md").read_text() and (out / "steer.png").stat().st_size
    intervention = probes.load(out / "iv")
    assert isinstance(intervention, Intervention) and intervention.hparams["k"] == 2 and intervention.alpha == 2.0
    assert intervention.head_list() == [tuple(h) for h in result.top_heads[2]]
    metrics = intervention.checkpoint_metrics_loaded
    s = result.summary(2, 2.0, "margin")
    assert metrics["effect/margin"] == pytest.approx(s["probe"]) and metrics["side/kl"] == pytest.approx(s["kl"])
    assert intervention.checkpoint_config_loaded.task == "sentiment"


def _bad(trained, tmp_path):
    ckpt = tmp_path / "sae-like"
    make_checkpoint(ckpt)
    return [
        (["--save", str(tmp_path / "iv")], "--save needs --alpha"),
        (["--alpha", "2"], "--alpha sets the strength .* pass --save DIR too"),
        (["--probe", str(ckpt)], "holds a HeadScorer: pass a LinearProbes checkpoint"),
        (["--store", str(trained["other"])], "holds task 'capitals'.*pass the probe's training store"),
        (["--model", trained["gpt2"]], "is not the model the probe was trained on"),
        (["--store", str(tmp_path / "missing.h5")], "does not exist"),
        (["--draws", "1"], "at least 2 random draws"),
        (["--k", "0"], "a whole number of 1 or more"),
        (["--k", "999"], "--k 999: steer between 1 and 18 heads"),
        (["--k", "10"], "--k 10: the random-heads control .* steer at most 9 heads"),
    ]


def test_bad_inputs_are_refused_in_one_line_and_write_nothing(trained, tmp_path, capsys):
    for extra, says in _bad(trained, tmp_path):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as done:
            main(_argv(trained, out, *extra))
        err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                        if not line.startswith("Loading weights"))  # transformers' progress bar
        assert done.value.code == 2, extra
        last = err.splitlines()[-1]  # argparse's usage lines come before its error
        assert last.startswith("headprobe") and re.search(says, last), (extra, err)
        assert "Traceback" not in err and (len(err.splitlines()) == 1 or err.startswith("usage:")), (extra, err)
        assert not out.exists() and not (tmp_path / "iv").exists(), extra


def test_a_finished_sweep_is_kept_unless_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "steer.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(_argv(trained, out))
    assert "holds a sweep (steer.json): pass --overwrite" in capsys.readouterr().err
    assert (out / "steer.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["steer.json"]
    main(_argv(trained, out, "--overwrite"))
    assert json.loads((out / "steer.json").read_text())["sentiment"]["task"] == "sentiment"


def test_the_attribution_reports_steering_as_a_check(trained, tmp_path):
    from headprobe.probes.attribution import AttributionConfig, attribute, write_attribution
    from headprobe.probes.attribution.api import earlier_outputs
    from headprobe.probes.attribution.kinds.steer import ALPHA, results_of

    config = AttributionConfig(steer=2, examples=8)
    result = attribute([trained["probe"]], [trained["store"]], trained["model"], config)
    (ev,) = result.of_kind("steer")
    sweep = results_of(result.evidence)["sentiment"]
    s = sweep.summary(2, ALPHA, "margin")
    heads = [tuple(h) for h in sweep.top_heads[2]]
    assert ev.task == "sentiment" and np.isfinite(ev.score).sum() == 2
    for layer, head in heads:
        assert ev.score[layer, head] == s["probe"]
        assert ev.null[layer, head] == max(s["random_direction"]["pi"][1], s["random_heads"]["pi"][1])
    assert ev not in result.stage_map.evidence  # a check, not pooled
    paths = write_attribution(result, tmp_path / "attr")
    report = paths["report"].read_text()
    assert "## Steering along probe directions" in report and f"| sentiment | margin | 2 | {ALPHA:g} |" in report
    for name in ("steer.json", "steer.csv", "steer.png"):
        assert (tmp_path / "attr" / name).stat().st_size > 0
        assert tmp_path / "attr" / name in earlier_outputs(tmp_path / "attr", overwrite=True)
    assert not AttributionConfig().steer and not attribute([trained["probe"]], [trained["store"]]).of_kind("steer")
