"""``headprobe run`` end to end on a tiny random Llama: every step, every report artefact, a cached second run, and
the page rendered in headless Chromium with every image loaded."""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headprobe.extract.tasks import TASKS
from headprobe.probes.checkpoint import load_local
from headprobe.train.loggers import read_offline_run
from headprobe.probes.attribution import AttributionConfig
from headprobe.train.pipeline import Pipeline, RunConfig, SAESettings, Steps
from headprobe.train.report import images_in
from helpers import run_snapshot, save_tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_config(model: Path, out: Path) -> RunConfig:
    return RunConfig(model=str(model), out=str(out), max_examples=40, logger="wandb", progress=False,
                     attribution=AttributionConfig(head_scores=True, ablate=8, draws=2, examples=16),
                     sae=SAESettings(layer=1, d_sae=96, k=4, batch_size=256, tokens=8192, corpus_examples=40,
                                     ce_tokens=256))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Pipeline, Path, float]:
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_llama(root / "tiny-llama")
    pipeline = Pipeline(tiny_config(model, root / "run"))
    t0 = time.perf_counter()
    page = pipeline.run().report
    return pipeline, page, time.perf_counter() - t0


def test_the_run_prints_its_steps_without_per_training_noise(tmp_path):
    """`headprobe run` in a process of its own (one task: 3 trainings): no per-training hardware lines, tips, W&B
    banners or known-harmless warnings; one line says where the offline W&B runs are. The SAE is a ReLU one, which
    takes train/configs/sae_relu.yaml's defaults as `headprobe train` does."""
    model = save_tiny_llama(tmp_path / "tiny-llama")
    cfg = tiny_config(model, tmp_path / "run")
    args = ["run", "--model", cfg.model, "--out", cfg.out, "--tasks", "[ioi]", "--max_examples", "40",
            "--attribution.draws", "2", "--attribution.examples", "16", "--progress", "false", "--sae.layer", "1",
            "--sae.d_sae", "96", "--sae.k", "4", "--sae.batch_size", "256", "--sae.tokens", "8192",
            "--sae.corpus_examples", "40", "--sae.ce_tokens", "256", "--sae.architecture", "relu"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", "from headprobe.train.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for noise in ("GPU available", "Tip:", "Seed set", "Run history", "Tracking run with wandb",
                  "configure_optimizers", "LeafSpec", "weights_only", "anonymous setting"):
        assert noise not in output, noise
    assert re.search(r"W&B: 3 offline runs under .*; upload one with `wandb sync ", output)
    assert "headprobe run:" in output
    hparams = load_local(tmp_path / "run" / "runs" / "sae" / "layer1" / "checkpoint").checkpoint_config_loaded.hparams
    assert hparams["architecture"] == "relu" and hparams["decoder_norm"] == "penalty" and hparams["k"] == 4
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "a ReLU (L1) sparse autoencoder was trained on layer 1" in report


def test_every_step_ran_and_every_artefact_is_written(finished_run):
    p, page, _ = finished_run
    names = [t.name for t in p.tasks]
    assert len(names) == 9 and all(s.status == "ran" for s in p.steps.summary)
    assert {f"{kind}/{t}" for kind in ("extract", "linear", "sparse") for t in names} <= set(p.steps.done())
    assert {"extract/corpus", "sae", "sae/eval", "attribute", "report"} <= set(p.steps.done())

    for t in names:  # a loadable checkpoint with metrics per task and kind, and each linear probe's heatmap
        for kind in ("linear", "sparse"):
            folder = p.run_dir(kind, t)
            assert load_local(folder / "checkpoint").checkpoint_config_loaded.task == t
            assert json.loads((folder / "checkpoint" / "metrics.json").read_text())
        assert (p.run_dir("linear", t) / "heatmap.png").read_bytes().startswith(PNG)
    sae = load_local(p.run_dir("sae", "layer1") / "checkpoint")
    assert sae.W_dec.shape == (96, 6 * 8)

    attr = p.out / "attribution"
    stage_map = json.loads((attr / "stage_map.json").read_text())
    assert stage_map and (attr / "stage_scores.csv").read_text().count("\n") > 18  # 3 layers x 6 heads + header
    assert (attr / "head_types.csv").is_file()
    ablation = json.loads((attr / "ablation.json").read_text())
    assert set(ablation) == set(names)  # every task has a model metric to ablate
    assert all({"clean", "top", "random_mean"} <= set(r) for r in ablation.values())
    assert all(r["pool"] == "all" and r["random_from"]["layers"]["top"] == r["top"] for r in ablation.values())
    layers_of = lambda heads: sorted(l for l, _ in heads)  # noqa: E731
    assert all(layers_of(d) == layers_of(r["top_heads"]) for r in ablation.values()
               for d in r["random_from"]["layers"]["random_heads"])  # layer-matched controls

    # W&B wrote an offline run per training, with its metrics
    runs = sorted(p.out.rglob("offline-run-*"))
    assert len(runs) == 2 * 9 + 1
    for run in runs:  # one run per training (not every training logging into the first), each with metrics
        assert any(k.startswith(("val/", "train/")) for row in read_offline_run(run)["history"] for k in row), run


def test_report_holds_every_section_and_image(finished_run):
    p, page, *_ = finished_run
    md = (page.parent / "report.md").read_text()
    for heading in ("## Stage map", "## Probes per task", "## Per-task probe accuracy", "## Sparse autoencoder",
                    "### Latents and the heads that write them", "## Run"):
        assert heading in md, heading
    for t in p.tasks:
        assert f"| {t.name} | {t.stage} |" in md and f"heatmap_{t.name}.png" in md
    assert re.search(r"\| fve \| -?\d", md) and re.search(r"\| ce_spliced \| \d", md)
    assert "Spearman" in md and "random" in md  # the pattern-score cross-check and the ablation comparison
    images = images_in(md)
    assert len(images) >= 13 and {"induction_check.png", "ablation.png"} <= {Path(i).name for i in images}
    # stage map, 9 heatmaps, SAE density, copy check, ablation
    for img in images:
        assert (page.parent / img).read_bytes().startswith(PNG), img
    html = page.read_text()
    assert html.count("<img") == len(images) and "<table>" in html


def test_second_run_is_cached_and_does_not_load_the_model(finished_run):
    p, page, *_ = finished_run
    before = page.stat().st_mtime_ns
    again = Pipeline(p.cfg)
    assert again.run().report == page
    assert all(s.status == "cached" for s in again.steps.summary)
    # the summary keeps the seconds each step took when it ran
    assert [round(s.seconds, 6) for s in again.steps.summary] == [round(s.seconds, 6) for s in p.steps.summary]
    assert again._loaded is None and page.stat().st_mtime_ns == before


def test_a_model_folder_whose_files_change_invalidates_the_cached_steps(tmp_path):
    """The extraction keys hold an identity of the model's files (read without loading the model), so new weights
    in the same folder are extracted again instead of reusing the old stores and everything trained on them."""
    import os

    from headprobe.extract.models import gguf_digest, source_fingerprint

    model = save_tiny_llama(tmp_path / "model")
    key = Pipeline(tiny_config(model, tmp_path / "run")).model_key
    assert Pipeline(tiny_config(model, tmp_path / "run")).model_key == key
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # rewritten in place
    assert Pipeline(tiny_config(model, tmp_path / "run")).model_key != key
    assert source_fingerprint("someone/hub-model") == "someone/hub-model"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    assert source_fingerprint(str(gguf)) == gguf_digest(gguf)


def test_chromium_loads_every_image_of_the_page(finished_run, tmp_path):
    _, page, *_ = finished_run
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is needed for this test: apt-get install -y chromium"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, f"the page's load handler did not run: {dom[:300]}"
    assert int(total.group(1)) == len(images_in((page.parent / "report.md").read_text()))
    assert int(loaded.group(1)) == int(total.group(1))
    links = re.findall(r'href="([^"]+\.(?:csv|json))"', dom)  # every per-head table the page links resolves and parses
    assert {"data/stage_map.csv", "data/stage_map.json", "data/heads_ioi.csv", "data/heads_ioi.json"} <= set(links)
    for link in links:
        text = (page.parent / link).read_text()
        rows = json.loads(text) if link.endswith(".json") else list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 3 * 6 and {"layer", "head", "stage"} <= set(rows[0]), link  # every head of the model


def test_steps_run_once_per_settings_and_know_stale_outputs(tmp_path):
    calls = []
    steps = Steps(tmp_path)
    assert steps("a", {"n": 1}, lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert not steps.stale("a", {"n": 1}) and steps.stale("a", {"n": 2}) and not steps.stale("b", {"n": 1})
    again = Steps(tmp_path)  # a new run reads the markers
    assert again("a", {"n": 1}, lambda: calls.append(2)) == {"x": 1} and calls == [1]
    again("a", {"n": 2}, lambda: calls.append(3))
    assert calls == [1, 3] and [s.status for s in again.summary] == ["cached", "ran"]


def test_interrupted_extractions_resume_under_their_own_settings_and_restart_under_others(tmp_path, monkeypatch):
    """Run 1 (40 examples) dies after a block; run 2 asks for 20: it starts again (it used to resume the 40-example
    file, be refused, and name an option `headprobe run` lacks, on every rerun). Run 3 asks for 40 again over run
    2's finished store, dies, and run 4 resumes its file instead of starting over."""
    from headprobe.extract.extractor import ExtractConfig
    from headprobe.extract.store import Store, StoreWriter, partial_path, progress_path
    from helpers import tiny_loaded

    pipeline = Pipeline(RunConfig(out=str(tmp_path / "run"), tasks=["ioi"], logger="none", progress=False))
    pipeline._loaded = tiny_loaded("llama")
    task, write = TASKS["ioi"], StoreWriter.write_block
    store = pipeline.store("ioi")

    def die(self, n, block):
        write(self, n, block)
        raise KeyboardInterrupt

    def extract(n: int, write_block=write):
        monkeypatch.setattr(StoreWriter, "write_block", write_block)
        key = {"model": "tiny", "task": "ioi", "seed": 0, "max": n}
        try:
            pipeline._extract("extract/ioi", key, task, ExtractConfig(max_examples=n, block_examples=16))
        except KeyboardInterrupt:
            return json.loads(progress_path(store).read_text())["examples_done"]

    assert extract(40, die) == 16
    extract(20)
    with Store(store) as s:
        assert s.meta.n_examples == 20 and not partial_path(store).exists()
    assert extract(40, die) == 16
    seen = []
    extract(40, lambda self, n, block: seen.append(self.examples_done) or write(self, n, block))
    assert seen == [16, 32]  # resumed after the first block
    with Store(store) as s:
        assert s.meta.n_examples == 40


@pytest.mark.parametrize("option, message", [
    (["--tasks", "[nope]"], "unknown task 'nope': run `headprobe tasks` to list them, or pass a .jsonl/.csv file or "
                            "hf:NAME"),
    (["--attribution.draws", "1"], "--draws 1: the ablation check needs at least 2 random draws"),
    (["--tasks", "[ioi,corpus]"], "--tasks ['ioi', 'corpus']: corpus: pick tasks with a stage ("
                                  + ", ".join(n for n, t in TASKS.items() if t.stage)
                                  + "), or give a user file its stage (a stage column, or FILE.jsonl:STAGE); the SAE's "
                                  "corpus is extracted anyway"),
    (["--max_examples", "0"], "--max_examples 0: pass a positive number, or null for every example"),
    (["--logger", "xyz"], "--logger: Expected one of 'wandb', 'csv', 'none'. Got value: xyz (`headprobe run --help` "
                          "lists the options)")])
def test_bad_run_options_give_one_line_errors(tmp_path, option, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", "from headprobe.train.cli import main; main()", "run", *option,
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"headprobe run: error: {message}"]
    assert not (tmp_path / "run").exists()  # refused before anything is written


SNAPSHOT = Path(__file__).parent / "data" / "run_snapshot.json"


def test_the_run_finds_what_it_found_before_the_redesign(finished_run):
    """The tiny run's stage map, ablation and cross-check tables, per-head tables and images equal the snapshot taken
    before the stages were rewired (numbers to a relative 1e-6, as ablation means move by ~1e-8 between runs; images
    byte for byte); regenerate it with HEADPROBE_UPDATE_SNAPSHOT=1 only for a change of findings that is explained
    in its commit."""
    p, *_ = finished_run
    now = run_snapshot(p.out)
    if os.environ.get("HEADPROBE_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(now, indent=0) + "\n")
    before = json.loads(SNAPSHOT.read_text())
    for part in ("files", "tables"):
        assert sorted(now[part]) == sorted(before[part]), part
        for key, values in before[part].items():
            flat = lambda rows: np.asarray([v for row in rows for v in (row if isinstance(row, list) else [row])],
                                           dtype=float)
            assert len(flat(now[part][key])) == len(flat(values)), f"{part}: {key}"
            np.testing.assert_allclose(flat(now[part][key]), flat(values), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{part}: {key}")
    assert now["images"] == before["images"]


def test_editing_a_packaged_yaml_default_retrains_that_step_only(tmp_path, monkeypatch):
    """Step keys hash the merged training configuration, packaged YAML included: a changed default in
    train/configs/linear.yaml retrains the linear probes (and what reads them), and nothing else."""
    import headprobe.train.fit as fit

    configs = tmp_path / "configs"
    shutil.copytree(fit.CONFIGS, configs)
    monkeypatch.setattr(fit, "CONFIGS", configs)
    model = save_tiny_llama(tmp_path / "model")
    cfg = RunConfig(model=str(model), out=str(tmp_path / "run"), tasks=["ioi"], max_examples=40, logger="none",
                    progress=False, attribution=AttributionConfig(),
                    sae=SAESettings(layer=1, d_sae=48, k=4, batch_size=256, tokens=2048, corpus_examples=20,
                                    ce_tokens=64))
    Pipeline(cfg).run()
    again = Pipeline(cfg)
    again.run()
    assert all(s.status == "cached" for s in again.steps.summary)
    yaml_file = configs / "linear.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("l2: 1.0 ", "l2: 0.5 "))
    edited = Pipeline(cfg)
    edited.run()
    ran = {s.name for s in edited.steps.summary if s.status == "ran"}
    assert ran == {"linear/ioi", "attribute", "report"}, ran
    assert load_local(edited.run_dir("linear", "ioi") / "checkpoint").checkpoint_config_loaded.hparams["l2"] == 0.5


def test_a_user_jsonl_task_with_group_and_stage_columns_goes_into_the_stage_map(tmp_path, capsys):
    """A user's file joins the run beside a built-in task: its stage from its `stage` column, its twins (one
    `group`) in one split, and its name kept apart from the built-in task it shares (facts.jsonl -> facts-file)."""
    from headprobe.extract.store import Store

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):  # true/false twins: one group each
        a, b = rng.integers(1, 9, size=2)
        for label, c in ((1, a + b), (0, a + b + 1)):
            rows.append({"text": f"{a} plus {b} is {c}", "label": label, "group": f"pair{i}", "stage": "LR"})
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = save_tiny_llama(tmp_path / "model")
    cfg = RunConfig(model=str(model), out=str(tmp_path / "run"), tasks=[str(data), "ioi"], max_examples=40,
                    logger="none", progress=False, attribution=AttributionConfig(),
                    sae=SAESettings(layer=1, d_sae=48, k=4, batch_size=256, tokens=2048, corpus_examples=20,
                                    ce_tokens=64))
    result = Pipeline(cfg).run()
    assert "facts.jsonl is named 'facts-file' in this run ('facts' is taken)" in capsys.readouterr().out
    pooled = {(ev.task, ev.stage, ev.source) for ev in result.attribution.pooled_evidence}
    assert {("facts-file", "LR", "linear"), ("facts-file", "LR", "sparse"), ("ioi", "ICI", "linear")} <= pooled
    with Store(tmp_path / "run" / "stores" / "facts-file.h5") as store:
        groups, splits = store.column("group"), store.column("split")
        assert all(len(set(splits[groups == g])) == 1 for g in set(groups))  # twins never straddle splits
        assert len(store) == 40  # --max_examples applies to every task
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| facts-file | LR |" in report and "data/heads_facts-file.csv" in report


def test_a_run_yaml_gives_the_same_configuration_in_python_as_on_the_command_line():
    """run_config (the Python path, e.g. bench/bench_main_job.py) and `headprobe run --quick` agree; fields a YAML
    leaves out keep the run's defaults."""
    import yaml

    from headprobe.train.fit import CONFIGS
    from headprobe.train.pipeline import run_config
    from headprobe.train.run_cli import parse

    settings = yaml.safe_load((CONFIGS / "run_quick.yaml").read_text())
    quick = run_config(settings)
    assert quick == parse(["--quick"])
    assert quick.attribution.draws == 4 and quick.attribution.ablate == RunConfig().attribution.ablate
    assert quick.sae.k == 16 and quick.sae.layer == RunConfig().sae.layer
