"""``headprobe run``: the whole pipeline, from text to a stage map of the model's heads, with a report.

    extract every task (+ the SAE corpus) -> linear and sparse probes per task -> an SAE on one layer
    -> attribution to heads and stages, with attention-pattern and ablation checks -> report

Each step is a call of a stage's Python function (``extract``, ``fit``, ``attribute``), cached under ``--out`` by
a key that hashes everything it depends on: its inputs' keys, its fully merged configuration (the packaged YAML of
a training included) and the step's version (:data:`STEP_VERSION`, raised when a step's code changes what it
computes). A second run with nothing changed skips finished work, an interrupted run picks up where it stopped
(extractions resume mid-file, trainings from their last epoch), and a step whose key changed starts again.

    from headprobe.train.pipeline import RunConfig, run
    result = run(RunConfig(tasks=["ioi", "capitals"], max_examples=200))
    result.report, result.attribution.stage_map.top_heads("ICI")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from headprobe import InputError
from headprobe.extract.models import DEFAULT_MODEL
from headprobe.probes.attribution.result import Attribution, AttributionConfig

# Raise a step's number when its code changes what it computes: its cached results are then recomputed.
STEP_VERSION = {"extract": 2, "linear": 1, "sparse": 1, "sae": 1, "sae/eval": 1, "attribute": 3, "report": 3}


@dataclass
class SAESettings:
    """The sparse autoencoder of ``headprobe run``.

    Args:
        layer: model layer whose concatenated z the SAE reads (null: the model's middle layer, n_layers // 2)
        architecture: topk, batchtopk, jumprelu or relu (with train/configs/sae_ARCH.yaml, if any)
        d_sae: number of latents (null: expansion x the layer's width, n_heads x d_head)
        expansion: latents per input dimension when d_sae is null
        k: active latents per token (top-k)
        batch_size: tokens per step
        tokens: training budget (passes over the train split = tokens / its rows)
        corpus_examples: corpus documents extracted (~175k tokens; null: all 4,580, ~320k)
        ce_tokens: held-out tokens for the CE loss recovered (4 forwards of the model each; causal LMs only)
    """

    layer: int | None = None
    architecture: str = "topk"
    d_sae: int | None = None
    expansion: int = 8
    k: int = 32
    batch_size: int = 4096
    tokens: int = 800_000
    corpus_examples: int | None = 2500
    ce_tokens: int = 2048


def run_attribution() -> AttributionConfig:
    """The attribution of ``headprobe run``: the attention-pattern cross-check, the ablation of each task's top 8
    heads against 10 random draws from all layers and 10 layer-matched ones, and the training-free scores, of which
    the retrieval score joins the stage map (docs/scores.md says why the others are reported beside it)."""
    return AttributionConfig(head_scores=True, ablate=8, scores=["retrieval", "negative", "copying", "successor",
                                                                 "induction"], pool_scores=["retrieval"])


@dataclass
class RunConfig:
    """Settings of ``headprobe run`` (print them with ``--print_config``; override any with ``--key value``).

    Args:
        model: alias, Hugging Face id or folder, or .gguf file
        out: run folder; finished steps are cached there
        tasks: tasks to probe: built-in names, user files (FILE.jsonl or .csv, with a stage column or FILE.jsonl:STAGE)
            or hf:NAME?text=..&label=..&stage=.. (null: every built-in task with a stage)
        max_examples: examples per task, for quick runs (null: all)
        seed: seed of the probes, the SAE and the splits
        logger: wandb (offline without credentials), csv or none
        sparse_alpha: group-lasso strength of the sparse probes (null: train/configs/sparse.yaml)
        attribution: the attribution and its checks, as the options of `headprobe attribute` (ablate: heads per
            task for the ablation check; draws: random draws per pool; random_from: all, layers or both; scale:
            share or max; ...)
        progress: progress bars
    """

    model: str = DEFAULT_MODEL
    out: str = "runs/default"
    tasks: list[str] | None = None
    max_examples: int | None = None
    seed: int = 0
    logger: Literal["wandb", "csv", "none"] = "wandb"
    sparse_alpha: float | None = None
    attribution: AttributionConfig = field(default_factory=run_attribution)
    sae: SAESettings = field(default_factory=SAESettings)
    progress: bool = True


@dataclass
class StepRecord:
    name: str
    status: Literal["ran", "cached"]
    seconds: float  # the time it took when it ran (for a cached step: in an earlier run)


@dataclass
class RunResult:
    """What ``headprobe run`` produced: the report page, the attribution, and each step's record."""

    out: Path
    report: Path
    attribution: Attribution
    steps: list[StepRecord]


class Steps:
    """Runs named steps once per key; records each step's status and time for the summary table."""

    def __init__(self, out: Path):
        self.folder = out / ".steps"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.summary: list[StepRecord] = []

    def __call__(self, name: str, key: dict, fn: Callable[[], dict | None]) -> dict:
        digest = self.digest(key)
        marker = self.folder / f"{name.replace('/', '_')}.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == digest:
                self.summary.append(StepRecord(name, "cached", float(saved.get("seconds", 0.0))))
                return saved.get("result") or {}
        t0 = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - t0
        marker.write_text(json.dumps({"key": digest, "result": result, "seconds": seconds}, default=str))
        self.summary.append(StepRecord(name, "ran", seconds))
        return result

    def stale(self, name: str, key: dict) -> bool:
        """Whether ``name`` finished before with another key (its outputs must be redone, not resumed)."""
        return self.key_of(name) not in ("", self.digest(key))

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def key_of(self, name: str) -> str:
        """The key digest a finished step ran with ("" if it has not run)."""
        marker = self.folder / f"{name.replace('/', '_')}.json"
        return json.loads(marker.read_text())["key"] if marker.exists() else ""

    def done(self) -> list[str]:
        return [s.name for s in self.summary]

    def table(self) -> str:
        """Each step's status in this run and the seconds it took when it ran (for a cached step: in an earlier run)."""
        width = max(len(s.name) for s in self.summary) + 2
        lines = [f"{'step':<{width}}{'status':<8}{'seconds':>9}"]
        lines += [f"{s.name:<{width}}{s.status:<8}{s.seconds:>9.1f}" for s in self.summary]
        ran = sum(s.seconds for s in self.summary if s.status == "ran")
        return "\n".join(lines + [f"{'total':<{width}}{'':<8}{sum(s.seconds for s in self.summary):>9.1f}",
                                  f"{'this run':<{width}}{'':<8}{ran:>9.1f}"])


def run_tasks(names: list[str] | None) -> list:
    """The tasks of a run: ``names`` (built-in names, user files ``path.jsonl[:STAGE]`` / ``.csv``, ``hf:`` refs),
    or every built-in task with a stage; each must have a stage. A user task whose name is taken (by a built-in
    task, the corpus or another task of the run) is renamed ``NAME-file``, ``NAME-file2``, ... and says so."""
    from dataclasses import replace

    from headprobe.extract.tasks import TASKS, resolve_task

    names = names if names is not None else [n for n, t in TASKS.items() if t.stage]
    tasks, taken = [], set(TASKS)
    for ref in names:
        task = resolve_task(ref)
        if task.extra.get("source") is not None and task.name in taken | {t.name for t in tasks}:
            new = next(f"{task.name}-file{i if i > 1 else ''}" for i in range(1, 1000)
                       if f"{task.name}-file{i if i > 1 else ''}" not in taken | {t.name for t in tasks})
            print(f"headprobe run: {ref} is named {new!r} in this run ({task.name!r} is taken)")
            task = replace(task, name=new)
        tasks.append(task)
    unstaged = [t.name for t in tasks if not t.stage]
    if unstaged or not tasks:
        raise InputError(f"--tasks {names}: {', '.join(unstaged) or 'none given'}: pick tasks with a stage "
                         f"({', '.join(n for n, t in TASKS.items() if t.stage)}), or give a user file its stage "
                         f"(a stage column, or FILE.jsonl:STAGE); the SAE's corpus is extracted anyway")
    return tasks


class Pipeline:
    """The steps of ``headprobe run``; each writes under ``cfg.out`` and is skipped when already done."""

    def __init__(self, cfg: RunConfig):
        if cfg.max_examples is not None and cfg.max_examples < 1:
            raise InputError(f"--max_examples {cfg.max_examples}: pass a positive number, or null for every example")
        self.tasks = run_tasks(cfg.tasks)
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.steps = Steps(self.out)
        self._loaded = None
        self._model_key: dict | None = None
        self.attribution: Attribution | None = None  # once the attribute step ran in this process
        self.sae_eval: dict = {}  # the SAE's held-out metrics, once its step ran (or was cached)
        self.model = None  # the RunModel (layout, context, capabilities), read from the config when the run starts
        self.skipped: dict[str, str] = {}  # the run's own checks the model cannot have, with the reason
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

    @property
    def sae_dir(self) -> Path:
        return self.run_dir("sae", f"layer{self.cfg.sae.layer}")

    def _bar(self, items: list, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="task", disable=not self.cfg.progress, dynamic_ncols=True)

    def resolve(self) -> None:
        """Fill the model-dependent defaults and check the settings against the model's config (no weights load)."""
        from headprobe.extract.models import open_model
        from headprobe.train.run_model import resolve_run, run_model, skipped_checks

        source = open_model(self.cfg.model)
        self.model = run_model(source.config, source.tokenizer, self.cfg.model)
        self.cfg = resolve_run(self.cfg, self.model)
        self.skipped = skipped_checks(self.cfg, self.model)

    # --- 1. extraction --------------------------------------------------------------------------------------------
    def extract_all(self) -> None:
        from headprobe.extract.extractor import ExtractConfig
        from headprobe.extract.tasks import get_task

        cfg = self.cfg
        corpus = ExtractConfig(layers=[cfg.sae.layer], seed=cfg.seed, max_examples=cfg.sae.corpus_examples,
                               truncate=True)  # documents longer than the model's context keep their end
        corpus_key = self._extract_key(get_task("corpus"), corpus)
        for task in self._bar(self.tasks, "extract"):
            config = ExtractConfig(seed=cfg.seed, max_examples=cfg.max_examples)
            self._extract(f"extract/{task.name}", self._extract_key(task, config), task, config)
        self._extract("extract/corpus", corpus_key, get_task("corpus"), corpus)

    def _extract_key(self, task, config) -> dict:
        """What an extraction depends on: the model's files, the task's name and examples, the settings."""
        from headprobe.extract.tasks import dataset_hash

        return {"version": STEP_VERSION["extract"], **self.model_key, "task": task.name,
                "examples": dataset_hash(task.examples(config.seed)), "config": asdict(config)}

    def _extract(self, step: str, key: dict, task, config) -> None:
        """Extract ``task`` as step ``step``. An interrupted extraction resumes only under the key it started with
        (recorded beside the step's marker); another key, or a finished store made under another, starts again."""
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
    def _fit(self, step: str, kind: str, store_step: str, folder: Path, overrides: dict,
             configs: list[str] | None = None) -> None:
        """Train ``kind`` on the store of ``store_step`` into ``folder`` as step ``step``; an interrupted training
        resumes only under the same key (another key, or a folder without one, starts over)."""
        from headprobe.train.fit import merged_config

        config = merged_config(kind, overrides, configs)
        key = {"version": STEP_VERSION[kind], "store": self.steps.key_of(store_step), "config": config,
               "seed": self.cfg.seed}
        digest, store = self.steps.digest(key), self.store(store_step.split("/", 1)[1])
        self.steps(step, key, lambda: self._train(kind, store, folder, overrides, configs, digest))

    def _train(self, kind: str, store: Path, folder: Path, overrides: dict, configs: list[str] | None,
               digest: str) -> dict:
        """One training into ``folder``; ``digest`` names its key, so that an interrupted training resumes only under
        the same one (a folder with another key, or none, starts over). Returns the scalar metrics."""
        from headprobe.train.fit import fit

        started = folder / "step_key"  # the key of a training that may not have finished
        if not started.exists() or started.read_text() != digest:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        started.write_text(digest)
        resume = (folder / "checkpoints" / "last.ckpt").exists()
        return fit(kind, store, folder, overrides, configs=configs, logger=self.cfg.logger, seed=self.cfg.seed,
                   resume=resume, overwrite=not resume, quiet=True).scalars()

    def train_all(self) -> None:
        cfg = self.cfg
        sparse = {} if cfg.sparse_alpha is None else {"model": {"init_args": {"alpha": cfg.sparse_alpha}}}
        for kind, overrides in (("linear", {}), ("sparse", sparse)):
            for task in self._bar(self.tasks, f"{kind} probes"):
                self._fit(f"{kind}/{task.name}", kind, f"extract/{task.name}", self.run_dir(kind, task.name),
                          overrides)
        s = cfg.sae
        overrides = {"model": {"init_args": {"architecture": s.architecture, "d_sae": s.d_sae, "k": s.k,
                                             "token_budget": s.tokens}},
                     "data": {"batch_size": s.batch_size}}
        from headprobe.train.fit import CONFIGS

        overlay = CONFIGS / f"sae_{s.architecture}.yaml"  # the architecture's own defaults, as in headprobe train
        self._fit("sae", "sae", "extract/corpus", self.sae_dir, overrides,
                  [overlay.name] if overlay.exists() else None)
        self.sae_eval = self.steps("sae/eval", {"version": STEP_VERSION["sae/eval"], "sae": self.steps.key_of("sae"),
                                                "ce_tokens": self.ce_tokens}, self.evaluate_sae)

    @property
    def ce_tokens(self) -> int:
        """Held-out tokens for the SAE's CE loss recovered: none where the model has no next-token logits."""
        return 0 if self.model is None or not self.model.capabilities.causal_lm else self.cfg.sae.ce_tokens

    def evaluate_sae(self) -> dict:
        from headprobe.probes.sae_eval import evaluate_checkpoint

        return evaluate_checkpoint(self.sae_dir / "checkpoint", self.store("corpus"), split="test",
                                   histogram=self.sae_dir / "density.png", ce_tokens=self.ce_tokens,
                                   loaded=self.loaded if self.ce_tokens else None)

    # --- 3. attribution and its checks --------------------------------------------------------------------------
    def attribute(self) -> dict:
        """Attribution of every checkpoint under ``runs/``, with the checks the configuration asks for."""
        from headprobe.probes.attribution import attribute, write_attribution

        self.attribution = attribute([self.out / "runs"], [self.store(t.name) for t in self.tasks], self.cfg.model,
                                     self.cfg.attribution, loaded=self.loaded)
        write_attribution(self.attribution, self.out / "attribution", overwrite=True)
        return {}

    def run(self) -> RunResult:
        from headprobe.train.report import run_report

        t0 = time.perf_counter()
        self.resolve()
        self.extract_all()
        self.train_all()
        keys = {name: self.steps.key_of(name) for name in self.steps.done()}
        self.steps("attribute", {"version": STEP_VERSION["attribute"], "inputs": keys,
                                 "config": asdict(self.cfg.attribution)}, self.attribute)
        if self.attribution is None:
            self.attribution = Attribution.load(self.out / "attribution")
        report = self.steps("report", {"version": STEP_VERSION["report"], "inputs": keys,
                                       "attribute": self.steps.key_of("attribute")},
                            lambda: {"path": str(run_report(self))})
        print(self.steps.table())
        offline = sorted((self.out / "runs").glob("*/*/wandb/offline-run-*"))
        if offline:
            print(f"W&B: {len(offline)} offline runs under {self.out / 'runs'}/*/*/wandb; upload one with "
                  f"`wandb sync {offline[0]}`")
        print(f"headprobe run: {time.perf_counter() - t0:.0f} s; report: {report['path']}")
        return RunResult(self.out, Path(report["path"]), self.attribution, list(self.steps.summary))


def run_config(settings: dict) -> RunConfig:
    """A RunConfig from settings as a run YAML holds them; ``attribution`` and ``sae`` may name only some fields,
    the others keep the run's defaults (e.g. ``run_config(yaml.safe_load(open("train/configs/run_quick.yaml")))``)."""
    base = RunConfig()
    return RunConfig(**{**settings,
                        "attribution": AttributionConfig(**{**asdict(base.attribution),
                                                            **settings.get("attribution", {})}),
                        "sae": SAESettings(**{**asdict(base.sae), **settings.get("sae", {})})})


def run(config: RunConfig | None = None) -> RunResult:
    """The whole pipeline (see the module docstring); ``headprobe run`` is a thin wrapper over this."""
    return Pipeline(config or RunConfig()).run()


def _rows(path: Path) -> int:
    from headprobe.extract.store import Store

    with Store(path) as store:
        return len(store)
