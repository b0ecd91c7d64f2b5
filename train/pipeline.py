"""``headprobe run``: the whole pipeline, from text to a stage map of the model's heads, with a report.

    extract every task (+ the SAE corpus) -> linear and sparse probes per task -> an SAE on a middle layer
    -> attention-pattern scores -> attribution to heads and stages -> causal ablation check -> report

Every step caches its result under ``--out`` keyed by the settings it depends on: a second run with nothing
changed skips finished work, and an interrupted run picks up where it stopped (extractions resume mid-file);
a step whose settings changed starts again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from headprobe import InputError
from headprobe.extract.models import DEFAULT_MODEL


@dataclass
class SAESettings:
    """The sparse autoencoder of ``headprobe run``.

    Args:
        layer: model layer whose concatenated z the SAE reads
        architecture: topk, batchtopk, jumprelu or relu (with train/configs/sae_ARCH.yaml, if any)
        d_sae: number of latents
        k: active latents per token (top-k)
        batch_size: tokens per step
        tokens: training budget (passes over the train split = tokens / its rows)
        corpus_examples: corpus documents extracted (~175k tokens; null: all 4,580, ~320k)
        ce_tokens: held-out tokens for the CE loss recovered (4 forwards of the model each)
    """

    layer: int = 15
    architecture: str = "topk"
    d_sae: int = 4608
    k: int = 32
    batch_size: int = 4096
    tokens: int = 800_000
    corpus_examples: int | None = 2500
    ce_tokens: int = 2048


@dataclass
class RunConfig:
    """Settings of ``headprobe run`` (print them with ``--print_config``; override any with ``--key value``).

    Args:
        model: alias, Hugging Face id or folder, or .gguf file
        out: run folder; finished steps are cached there
        tasks: built-in tasks to probe (null: every task with a stage)
        max_examples: examples per task, for quick runs (null: all)
        seed: seed of the probes, the SAE and the splits
        logger: wandb (offline without credentials), csv or none
        sparse_alpha: group-lasso strength of the sparse probes (null: train/configs/sparse.yaml)
        top_k: heads per task for the causal ablation check
        ablation_draws: random-head draws to compare the top heads with (at least 2)
        ablation_examples: task examples per ablation metric
        ablation_random_from: random heads from all layers, layer-matched to the top heads, or both
        stage_scale: stage map: each evidence scaled by its total (share) or by its best head (max)
        progress: progress bars
    """

    model: str = DEFAULT_MODEL
    out: str = "runs/default"
    tasks: list[str] | None = None
    max_examples: int | None = None
    seed: int = 0
    logger: Literal["wandb", "csv", "none"] = "wandb"
    sparse_alpha: float | None = None
    top_k: int = 8
    ablation_draws: int = 10
    ablation_examples: int = 64
    ablation_random_from: Literal["all", "layers", "both"] = "both"
    stage_scale: Literal["share", "max"] = "share"
    sae: SAESettings = field(default_factory=SAESettings)
    progress: bool = True


class Steps:
    """Runs named steps once per settings key; records each step's status and time for the summary table."""

    def __init__(self, out: Path):
        self.folder = out / ".steps"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.summary: list[tuple[str, str, float]] = []  # (step, "ran" | "cached", seconds it took when it ran)

    def __call__(self, name: str, key: dict, fn: Callable[[], dict | None]) -> dict:
        digest = self.digest(key)
        marker = self.folder / f"{name.replace('/', '_')}.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == digest:
                self.summary.append((name, "cached", float(saved.get("seconds", 0.0))))
                return saved.get("result") or {}
        t0 = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - t0
        marker.write_text(json.dumps({"key": digest, "result": result, "seconds": seconds}, default=str))
        self.summary.append((name, "ran", seconds))
        return result

    def stale(self, name: str, key: dict) -> bool:
        """Whether ``name`` finished before with other settings (its outputs must be redone, not resumed)."""
        return self.key_of(name) not in ("", self.digest(key))

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def key_of(self, name: str) -> str:
        """The settings digest a finished step ran with ("" if it has not run)."""
        marker = self.folder / f"{name.replace('/', '_')}.json"
        return json.loads(marker.read_text())["key"] if marker.exists() else ""

    def done(self) -> list[str]:
        return [n for n, _, _ in self.summary]

    def table(self) -> str:
        """Each step's status in this run and the seconds it took when it ran (for a cached step: in an earlier run)."""
        width = max(len(n) for n, _, _ in self.summary) + 2
        lines = [f"{'step':<{width}}{'status':<8}{'seconds':>9}"]
        lines += [f"{n:<{width}}{s:<8}{t:>9.1f}" for n, s, t in self.summary]
        ran = sum(t for _, s, t in self.summary if s == "ran")
        return "\n".join(lines + [f"{'total':<{width}}{'':<8}{sum(t for _, _, t in self.summary):>9.1f}",
                                  f"{'this run':<{width}}{'':<8}{ran:>9.1f}"])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("headprobe", "torch", "lightning", "transformers", "h5py", "scikit-learn", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


class Pipeline:
    """The steps of ``headprobe run``; each writes under ``cfg.out`` and is skipped when already done."""

    def __init__(self, cfg: RunConfig):
        from headprobe.extract.tasks import TASKS, get_task

        if cfg.top_k > 0 and cfg.ablation_draws < 2:
            raise InputError(f"ablation_draws {cfg.ablation_draws}: the ablation check needs at least 2 random draws")
        names = cfg.tasks if cfg.tasks is not None else [n for n, t in TASKS.items() if t.stage]
        self.tasks = [get_task(n) for n in names]
        unstaged = [t.name for t in self.tasks if not t.stage]
        if unstaged or not self.tasks:
            raise InputError(f"--tasks {names}: {', '.join(unstaged) or 'none given'}: pick tasks with a stage "
                             f"({', '.join(n for n, t in TASKS.items() if t.stage)}); the SAE's corpus is extracted "
                             f"anyway")
        if cfg.max_examples is not None and cfg.max_examples < 1:
            raise InputError(f"--max_examples {cfg.max_examples}: pass a positive number, or null for every example")
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.steps = Steps(self.out)
        self._loaded = None
        self._model_key: dict | None = None
        self.attribution = None  # the Attribution, once the attribute step has run in this process
        self.sae_eval: dict = {}  # the SAE's held-out metrics, once its step has run (or was cached)
        os.environ.setdefault("WANDB_RUN_GROUP", f"headprobe-run-{self.out.name}")
        if cfg.logger == "wandb":  # offline without credentials; wandb's cache and config stay under --out
            from headprobe.train.loggers import wandb_environment

            wandb_environment(self.out / "wandb")
            os.environ.setdefault("WANDB_SILENT", "true")  # 19 runs' banners would bury the progress bars

    @property
    def loaded(self):
        """The model, loaded on first use (a fully cached run never loads it)."""
        if self._loaded is None:
            from headprobe.extract.models import load_model

            self._loaded = load_model(self.cfg.model)
        return self._loaded

    @property
    def model_key(self) -> dict:
        """What the extractions depend on of the model: its name and an identity of its files (a folder or GGUF
        whose weights change invalidates every cached step), computed without loading it."""
        if self._model_key is None:
            from headprobe.extract.models import source_fingerprint

            self._model_key = {"model": self.cfg.model, "source": source_fingerprint(self.cfg.model)}
        return self._model_key

    def store(self, name: str) -> Path:
        return self.out / "stores" / f"{name}.h5"

    def run_dir(self, kind: str, name: str) -> Path:
        return self.out / "runs" / kind / name

    def _bar(self, items: list, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="task", disable=not self.cfg.progress, dynamic_ncols=True)

    # --- 1. extraction --------------------------------------------------------------------------------------------
    def extract_all(self) -> None:
        from headprobe.extract.extractor import ExtractConfig
        from headprobe.extract.tasks import get_task

        cfg = self.cfg
        corpus_key = {**self.model_key, "layer": cfg.sae.layer, "n": cfg.sae.corpus_examples, "seed": cfg.seed}
        if self.steps.key_of("extract/corpus") != self.steps.digest(corpus_key):  # check before the other tasks run
            from headprobe.extract.hooks import head_layout

            n_layers = head_layout(self.loaded.model).n_layers
            if not 0 <= cfg.sae.layer < n_layers:
                raise InputError(f"--sae.layer {cfg.sae.layer}: {cfg.model} has layers 0..{n_layers - 1}")
        for task in self._bar(self.tasks, "extract"):
            key = {**self.model_key, "task": task.name, "seed": cfg.seed, "max": cfg.max_examples}
            config = ExtractConfig(seed=cfg.seed, max_examples=cfg.max_examples)
            self._extract(f"extract/{task.name}", key, task, config)
        self._extract("extract/corpus", corpus_key, get_task("corpus"),
                      ExtractConfig(layers=[cfg.sae.layer], seed=cfg.seed, max_examples=cfg.sae.corpus_examples))

    def _extract(self, step: str, key: dict, task, config) -> None:
        """Extract ``task`` as step ``step``. An interrupted extraction resumes only under the settings it started
        with (recorded beside the step's marker); other settings, or a finished store made with other settings,
        start again."""
        from headprobe.extract.extractor import extract
        from headprobe.extract.store import partial_path

        store, digest = self.store(task.name), self.steps.digest(key)
        started = self.steps.folder / f"{step.replace('/', '_')}.started"
        if partial_path(store).exists():
            resume = started.exists() and started.read_text() == digest
        else:
            resume = not self.steps.stale(step, key)

        def run() -> dict:
            started.write_text(digest)
            return {"rows": _rows(extract(self.loaded, task, store, config, resume=resume, overwrite=not resume,
                                          progress=self.cfg.progress))}
        self.steps(step, key, run)

    # --- 2. probes and the SAE --------------------------------------------------------------------------------------
    def _fit(self, step: str, key: dict, kind: str, store: Path, folder: Path, extra: list[str]) -> None:
        """Train ``kind`` on ``store`` into ``folder`` as step ``step``, resuming an interrupted run."""
        digest = self.steps.digest(key)
        self.steps(step, key, lambda: self._train(kind, store, folder, extra, digest))

    def _train(self, kind: str, store: Path, folder: Path, extra: list[str], digest: str) -> dict:
        """One training into ``folder``; ``digest`` names its settings, so that an interrupted training resumes only
        under the same ones (a finished step with other settings, or a folder without a digest, starts over)."""
        from headprobe.train.fit import expand_short_form, run

        started = folder / "step_key"  # the settings of a training that may not have finished
        if not started.exists() or started.read_text() != digest:  # other or unknown settings: start over
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        started.write_text(digest)
        resume = (folder / "checkpoints" / "last.ckpt").exists()
        argv = [kind, "--data.path", str(store), "--out", str(folder), "--logger", self.cfg.logger,
                "--seed_everything", str(self.cfg.seed), "--resume", str(resume).lower(),
                "--overwrite", str(not resume).lower(), *extra]
        logs = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
        levels = [log.level for log in logs]
        for log in logs:  # one training of many: no per-run hardware, seed and tip lines
            log.setLevel(max(log.level, logging.WARNING))
        try:
            run(expand_short_form(argv))
        finally:
            for log, level in zip(logs, levels):
                log.setLevel(level)
        metrics = json.loads((folder / "checkpoint" / "metrics.json").read_text())
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def train_all(self) -> None:
        cfg = self.cfg
        alpha = [] if cfg.sparse_alpha is None else ["--model.init_args.alpha", str(cfg.sparse_alpha)]
        for kind, extra in (("linear", []), ("sparse", alpha)):
            for task in self._bar(self.tasks, f"{kind} probes"):
                key = {"store": self.steps.key_of(f"extract/{task.name}"), "extra": extra, "seed": cfg.seed}
                self._fit(f"{kind}/{task.name}", key, kind, self.store(task.name), self.run_dir(kind, task.name),
                          extra)
        s = cfg.sae
        extra = ["--model.init_args.architecture", s.architecture, "--model.init_args.d_sae", str(s.d_sae),
                 "--model.init_args.k", str(s.k), "--model.init_args.token_budget", str(s.tokens),
                 "--data.batch_size", str(s.batch_size)]
        key = {"store": self.steps.key_of("extract/corpus"), "extra": extra, "seed": cfg.seed}
        from headprobe.train.fit import CONFIGS

        overlay = CONFIGS / f"sae_{s.architecture}.yaml"  # the architecture's own defaults, as in headprobe train
        if overlay.exists():
            key["overlay"] = hashlib.sha256(overlay.read_bytes()).hexdigest()[:16]
            extra = ["--config", str(overlay), *extra]
        self._fit("sae", key, "sae", self.store("corpus"), self.run_dir("sae", f"layer{s.layer}"), extra)
        self.sae_eval = self.steps("sae/eval", {"sae": self.steps.key_of("sae"), "ce_tokens": s.ce_tokens},
                                   self.evaluate_sae)

    def evaluate_sae(self) -> dict:
        from headprobe.probes.sae_eval import evaluate_checkpoint

        folder = self.run_dir("sae", f"layer{self.cfg.sae.layer}")
        return evaluate_checkpoint(folder / "checkpoint", self.store("corpus"), split="test",
                                   histogram=folder / "density.png", ce_tokens=self.cfg.sae.ce_tokens,
                                   loaded=self.loaded)

    # --- 3. attribution and cross-checks ----------------------------------------------------------------------------
    def attribute(self) -> dict:
        """Attribution of every checkpoint under ``runs/``, with the head-type and ablation checks."""
        from headprobe.probes.attribution import AttributionConfig, attribute, write_attribution

        cfg = self.cfg
        config = AttributionConfig(head_scores=True, ablate=cfg.top_k, draws=cfg.ablation_draws,
                                   examples=cfg.ablation_examples, random_from=cfg.ablation_random_from,
                                   scale=cfg.stage_scale)
        self.attribution = attribute([self.out / "runs"], [self.store(t.name) for t in self.tasks], cfg.model,
                                     config, loaded=self.loaded)
        write_attribution(self.attribution, self.out / "attribution", overwrite=True)
        return {}

    def run(self) -> Path:
        t0 = time.perf_counter()
        self.extract_all()
        self.train_all()
        keys = {name: self.steps.key_of(name) for name in self.steps.done()}
        settings = {"top_k": self.cfg.top_k, "draws": self.cfg.ablation_draws, "examples": self.cfg.ablation_examples,
                    "random_from": self.cfg.ablation_random_from, "stage_scale": self.cfg.stage_scale,
                    "controls": "layer-matched v2, readout"}  # v1 drew from the union of the top heads' layers
        self.steps("attribute", {**keys, **settings}, self.attribute)
        report = self.steps("report", {"inputs": keys, "attribute": self.steps.key_of("attribute")},
                            lambda: {"path": str(build_report(self))})
        print(self.steps.table())
        offline = sorted((self.out / "runs").glob("*/*/wandb/offline-run-*"))
        if offline:
            print(f"W&B: {len(offline)} offline runs under {self.out / 'runs'}/*/*/wandb; upload one with "
                  f"`wandb sync {offline[0]}`")
        print(f"headprobe run: {time.perf_counter() - t0:.0f} s; report: {report['path']}")
        return Path(report["path"])


def _rows(path: Path) -> int:
    from headprobe.extract.store import Store

    with Store(path) as store:
        return len(store)


# --- the report -------------------------------------------------------------------------------------------------------
def _copy(src: Path, folder: Path, name: str) -> str:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / "img" / name)
    return f"img/{name}"


def _probe_table(p: Pipeline) -> str:
    rows = ["| task | stage | rows | best head (val acc) | mean val acc | max selectivity (control task / shuffled "
            "labels) | heads kept by group lasso |", "|---|---|---|---|---|---|---|"]
    for t in p.tasks:
        heads = json.loads((p.run_dir("linear", t.name) / "heads.json").read_text())["heads"]
        best = max(heads, key=lambda h: h.get("val/acc", 0))
        sel = [max(h.get(f"val/selectivity_{c}", float("nan")) for h in heads) for c in ("control", "shuffled")]
        # read at one token type (e.g. always the prompt's last word), the control task has one label: no baseline
        # (training skips it and says so in metrics.json; runs from before that fitted it to accuracy 1)
        linear = json.loads((p.run_dir("linear", t.name) / "checkpoint" / "metrics.json").read_text())
        one_label = "control" in linear.get("controls_skipped", {}) or min(h.get("val/acc_control", 0)
                                                                             for h in heads) > 0.999
        control = "n/a" if one_label else f"{sel[0]:.3f}"
        sparse = json.loads((p.run_dir("sparse", t.name) / "checkpoint" / "metrics.json").read_text())
        kept = sparse.get("heads_selected", sparse.get("val/heads_selected", float("nan")))
        mean = sum(h["val/acc"] for h in heads) / len(heads)
        rows.append(f"| {t.name} | {t.stage} | {_rows(p.store(t.name))} | L{best['layer']}.H{best['head']} "
                    f"({best['val/acc']:.3f}) | {mean:.3f} | {control} / {sel[1]:.3f} | {kept:.0f} |")
    note = ("\n\nn/a: every row of the task is read at one token type, so its control task has one label and gives "
            "no baseline (training skips it; shuffled labels remain).")
    return "\n".join(rows) + (note if any(" | n/a / " in r for r in rows) else "")


def _top_tokens(p: Pipeline, n_features: int = 8, n_tokens: int = 5, context: int = 6) -> str:
    """The SAE latents with the largest decoder share on the stage map's top heads, with their top tokens."""
    import numpy as np
    import torch

    from headprobe.extract.store import Store
    from headprobe.probes.attribution.kinds.sae import decoder_head_shares
    from headprobe.probes.checkpoint import load_local

    sae = load_local(p.run_dir("sae", f"layer{p.cfg.sae.layer}") / "checkpoint")
    tok = p.loaded.tokenizer
    with Store(p.store("corpus")) as store:
        rows = store.rows("test")[:20000]
        z = torch.from_numpy(store.activations(rows)).flatten(1)  # (N, H * D)
        ids, ex = store.column("token_id"), store.column("example_id")
        with torch.no_grad():
            acts = torch.cat([sae.encode(z[i:i + 4096]) for i in range(0, len(z), 4096)])  # (N, F)
    shares = decoder_head_shares(sae.W_dec.detach().float().numpy(), store.meta.n_heads)  # (F, H)
    fired = (acts > 0).sum(0).numpy()
    out = ["| latent | head with largest decoder share (share) | fires on | top-activating tokens (in context) |",
           "|---|---|---|---|"]
    order = [f for f in np.argsort(-shares.max(1)) if fired[f] >= n_tokens][:n_features]
    for f in order:
        top = torch.topk(acts[:, f], n_tokens).indices.numpy()
        shown = []
        for r in rows[top]:
            lo = max(r - context, 0)
            keep = [i for i in range(lo, r + 1) if ex[i] == ex[r]]
            text = tok.decode(ids[keep[:-1]]) + "[[" + tok.decode(ids[r:r + 1]) + "]]"
            shown.append("`" + text.replace("|", "/").replace("`", "'").replace("\n", " ") + "`")
        h = int(shares[f].argmax())
        out.append(f"| {f} | L{p.cfg.sae.layer}.H{h} ({shares[f, h]:.2f}) | {fired[f] / len(rows):.2%} of tokens | "
                   f"{'<br>'.join(shown)} |")
    return "\n".join(out)


SAE_NAMES = {"topk": "TopK", "batchtopk": "BatchTopK", "relu": "ReLU (L1)", "jumprelu": "JumpReLU"}


def build_report(p: Pipeline) -> Path:
    from headprobe.probes.attribution import Attribution, report_sections
    from headprobe.train.report import write_report

    folder = p.out / "report"
    attr = p.out / "attribution"
    result = p.attribution if p.attribution is not None else Attribution.load(attr)
    stage_png = _copy(attr / "stage_map.png", folder, "stage_map.png")
    (folder / "img").mkdir(parents=True, exist_ok=True)
    attribution_md = "\n".join(report_sections(result, folder / "img", "img/", stage_image=None,
                                                title="Top heads per stage and their evidence"))
    sections = [
        f"Model `{p.cfg.model}`; {len(p.tasks)} tasks over the four reasoning stages of Zheng et al. (2024). Each "
        f"head's output z was probed per task (linear probes for every head at once, a group-lasso probe choosing "
        f"heads), a {SAE_NAMES.get(p.cfg.sae.architecture, p.cfg.sae.architecture)} sparse autoencoder was trained on "
        f"layer {p.cfg.sae.layer}, and the evidence was pooled into a stage per head, then checked against "
        f"attention-pattern scores and by ablating each task's top heads.",
        f"## Stage map\n\n![stage map]({stage_png})",
        demote(attribution_md),
        "## Probes per task\n\n" + _probe_table(p),
        "## Per-task probe accuracy (each head's linear probe on held-out rows: test accuracy, or val where a "
        "store has no test split; the title names it)\n\n" + "\n\n".join(
            f"![{t.name}]({_copy(p.run_dir('linear', t.name) / 'heatmap.png', folder, f'heatmap_{t.name}.png')})"
            for t in p.tasks),
    ]
    sae_dir = p.run_dir("sae", f"layer{p.cfg.sae.layer}")
    ev = p.sae_eval
    keys = ("fve", "l0", "mse", "cosine", "dead_frac", "dense_frac", "ce_clean", "ce_spliced", "ce_recovered_zero",
            "ce_recovered_mean")
    sae_rows = "\n".join(f"| {k} | {ev[k]:.4g} |" for k in keys if k in ev)
    density = _copy(sae_dir / "density.png", folder, "density.png")
    sections.append(f"## Sparse autoencoder (layer {p.cfg.sae.layer}, held-out corpus tokens)\n\n| metric | value |\n"
                    f"|---|---|\n{sae_rows}\n\n![feature density]({density})"
                    f"\n\n### Latents and the heads that write them\n\n{_top_tokens(p)}")
    sections.append("## Run\n\n```yaml\n" + _yaml(asdict(p.cfg)) + "```\n\n| package | version |\n|---|---|\n" +
                    "\n".join(f"| {k} | {v} |" for k, v in versions().items()) +
                    "\n\n```\n" + p.steps.table() + "\n```\n\nCommand: `"
                    + " ".join(["headprobe", *sys.argv[1:]]) + "`")
    return write_report(folder, "headprobe report", sections)


def demote(markdown: str) -> str:
    """Every heading one level down (``## x`` -> ``### x``), for a section nested in the run's report."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.M)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

    from headprobe.train.cli import guarded, parse_error

    parser = ArgumentParser(prog="headprobe run", description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below "
                        "(--print_config prints the current configuration)")
    parser.add_class_arguments(RunConfig, nested_key=None, fail_untyped=False)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv).as_dict()
    except ArgumentError as err:
        print(f"headprobe run: error: {parse_error(err)} (`headprobe run --help` lists the options)", file=sys.stderr)
        sys.exit(2)
    args.pop("config", None)
    args = {k: v for k, v in args.items() if not k.startswith("__")}
    guarded("headprobe run", lambda: Pipeline(RunConfig(**{**args, "sae": SAESettings(**args["sae"])})).run())
