"""The causal check as evidence: each task's top-k heads (ranked by the pooled evidence) mean-ablated against k
random heads from all layers and layer-matched ones (:mod:`headprobe.probes.checks.ablation`), on the task's model
metric and, for true/false statements, on the last layer's readout of the label (:mod:`.checks.readout`).

Its evidence is not pooled into the stage map: per task, the top heads carry the metric's drop when they are
ablated, against the drop at the edge of one random draw's 95% prediction interval as the null (other heads NaN);
the full result (``ablation.json``) rides in ``extra["result"]``.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from headprobe import InputError
from headprobe.extract.capabilities import capabilities_of
from headprobe.extract.hooks import head_layout
from headprobe.extract.tasks import find_task
from headprobe.extract.tasks.metrics import example_ids, model_metric, probe_reads_after_scoring, right_padded
from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence, top_heads
from headprobe.probes.checks.ablation import causal_checks, head_means, metric_rows, plot_ablation
from headprobe.probes.checks.readout import READOUT, readout_metric


def _interval(pi) -> str:
    return "-" if pi is None else f"[{pi[0]:.3f}, {pi[1]:.3f}]"  # absent in an older ablation.json


def _shared(c: dict) -> str:
    """Mean number of top heads in a random draw, of k (a layer-matched draw may take some)."""
    if not c.get("random_heads"):
        return "-"  # absent in an older ablation.json
    top = {tuple(h) for h in c["top_heads"]}
    return f"{np.mean([len(top & {tuple(h) for h in d}) for d in c['random_heads']]):.1f}/{len(top)}"


def ablation_section(results: dict[str, dict], folder: Path | None = None, link: str = "") -> str:
    """The ablation table (and, given a ``folder``, ``ablation.png`` written there, linked as ``link + name`` and
    shown above the table)."""
    out = ["## Causal check: ablating each task's top heads", ""]
    if not results:
        return "\n".join(out + ["No task with a model metric was ablated.", ""])
    draws = "/".join(str(n) for n in sorted({len(r["random"]) for r in results.values()}))
    pools = {c.get("pool", "all") for r in results.values() for c in [r, *r.get("random_from", {}).values()]}
    about = {"all": "from all layers (the top heads left out)",
             "layers": "layer-matched: from each layer of the top heads as many as the top set has there, drawn from "
                       "all of that layer's heads (the top ones included, so that the top set could be one of the "
                       "draws), which asks whether the heads matter more than other heads of their layers"}
    out += ["Top hurts more: the top-k result lies below the 95% prediction interval of one random draw, where a "
            f"set of k heads like the random ones lands about 2.5% of the time ({draws} draws). Random heads come "
            + " or ".join(about[p] for p in POOLS if p in pools) + ". The mean's CI is shown for reference. A "
            "layer-matched draw that shares most of the top heads (when they fill most of their layers) can hardly "
            "differ from them, so a \"no\" there says little.", ""]
    if folder is not None:
        plot_ablation(results, Path(folder) / "ablation.png")
        out += [f"![ablation: top heads against random heads]({link}ablation.png)", ""]
    out += ["| task | metric | k | mode | clean | top-k ablated | random k from | random k ablated: mean [95% CI] | "
            "one random draw: 95% interval | top heads per draw | top hurts more | probe reads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in metric_rows(results):
        after = r.get("probe_after_scored")  # absent in an ablation.json from an older headprobe, and in a readout
        reads = ("the answer, last layer†" if r["metric"] == READOUT else "-" if after is None
                 else "the answer (after*)" if after else "the scored position")
        for c in [r, *r.get("random_from", {}).values()]:
            out.append(f"| {task} | {r['metric']} | {r['k']} | {r['mode']} | {r['clean']:.3f} | {r['top']:.3f} | "
                       f"{POOLS[c.get('pool', 'all')]} | {c['random_mean']:.3f} [{c['random_ci'][0]:.3f}, "
                       f"{c['random_ci'][1]:.3f}] | {_interval(c.get('random_pi'))} | {_shared(c)} | "
                       f"{'yes' if c['hurts_more'] else 'no'} | {reads} |")
    if any(r.get("probe_after_scored") for r in results.values()):
        out += ["", "\\* True/false statements: the probes read the answer token, while the margin scores the "
                "model's prediction of the answer at the positions before it. Ablating the heads there tests what "
                "they do at the prompt's end, not what the probe read; a \"no\" is weaker evidence against these "
                "heads. A behavioural metric at the answer token would need the model to judge the finished "
                "statement when asked (`python bench/bench_judgement.py --model MODEL` measures whether it does); "
                "the readout rows (†) score that token from the model's last layer instead."]
    if any("readout" in r for r in results.values()):
        out += ["", f"† {READOUT}: the same heads ablated, scored at the token the probes read. Logistic "
                "probes fit once on the clean model's final hidden state there (after the last norm, what the LM head "
                "reads; cross-fit, never on a scored example's group) give each example's log-probability of its "
                "label. This asks whether the heads carry the label on to the last layer, not whether the model's "
                "output changes: the model is never asked to judge these statements. A clean value near chance "
                "(-0.69 for two labels) means the last layer does not carry the label, so a \"yes\" there would not "
                "show that the heads carry it; as the readout is fit once, ablation can also push values below "
                "chance (the hidden states moved along its direction)."]
    return "\n".join(out + [""])


CONTINUOUS = {"choice": "margin", "induction": "copy_logprob"}


POOLS = {"all": "all layers", "layers": "layer-matched"}  # where an ablation's random heads come from


def ablation_metric(loaded, task, n_examples: int, mode: str,
                    metric: str = "auto") -> tuple[list, str, Callable[[object], np.ndarray], torch.Tensor | None]:
    """What the ablation check of ``task`` runs: (its ``n_examples`` examples, the metric's name, ``metric(model)``
    -> one value per example, the heads' mean z (L, H, D) on those examples for mean ablation, else None)."""
    examples = task.examples(0)
    pick = np.sort(np.random.default_rng(0).choice(len(examples), min(n_examples, len(examples)), replace=False))
    examples = [examples[i] for i in pick]
    ids = [example_ids(loaded.tokenizer, ex) for ex in examples]
    means = head_means(loaded.model, [right_padded(ids)]) if mode == "mean" else None
    key = CONTINUOUS.get(task.metric, "metric") if metric == "auto" else "metric"
    return examples, key, lambda m: model_metric(loaded, task, examples)[key], means


def run_ablations(loaded, evidence: list[Evidence], k: int, mode: str, draws: int, n_examples: int,
                  metric: str = "auto", pools: tuple[str, ...] = ("all", "layers"),
                  skip: Callable[[str, str], None] | None = None) -> dict[str, dict]:
    """Each task's top-k heads ablated against k random heads from each of ``pools`` (see
    :func:`probes.ablation.draw_random_heads`; the random draws are seeded by the task's name): the first pool's
    result, with the others' under ``random_from``. Where the probes read a token after the scored one (true/false
    statements), the same heads are also checked on the last layer's readout of the label (``readout``, see
    :mod:`probes.readout`). A model without next-token logits (an encoder) is checked on the readout alone;
    ``skip(check, why)`` hears of each task that cannot be checked."""
    why = capabilities_of(loaded).missing(("causal_lm",))
    if why:
        return readout_ablations(loaded, evidence, k, mode, draws, n_examples, pools, why, skip)
    def check(task_name: str, key: str, task_metric: Callable[[object], np.ndarray], means) -> dict:
        checks = causal_checks(loaded.model, task_metric, top_heads(evidence, task_name, k), n_draws=draws, mode=mode,
                               means=means, pools=pools, seed=zlib.crc32(task_name.encode()))
        for pool, res in checks.items():
            print(f"attribute: {task_name} ({key}): clean {res.clean:.3f}, top-{k} ablated {res.top:.3f}, random "
                  f"from {POOLS[pool]} {res.random_mean:.3f} [{res.random_ci[0]:.3f}, {res.random_ci[1]:.3f}], "
                  f"one draw {_interval(res.random_pi)}: top hurts more: {'yes' if res.hurts_more else 'no'}")
        return {**checks[pools[0]].to_dict(), "metric": key,
                "random_from": {pool: res.to_dict() for pool, res in checks.items() if pool != pools[0]}}

    results = {}
    for task_name in sorted({ev.task for ev in evidence}):
        task = find_task(task_name)
        if task is None or getattr(task, "metric", "none") == "none":
            print(f"attribute: {task_name}: no model metric, skipping the ablation")
            continue
        examples, key, task_metric, means = ablation_metric(loaded, task, n_examples, mode, metric)
        after = probe_reads_after_scoring(task, examples)
        results[task_name] = {**check(task_name, key, task_metric, means), "n_examples": len(examples),
                              "probe_after_scored": after}
        if after:
            readout = readout_metric(loaded.model, loaded.tokenizer, task.examples(0), examples)
            results[task_name]["readout"] = check(task_name, READOUT, readout, means)
    return results


def readout_ablations(loaded, evidence: list[Evidence], k: int, mode: str, draws: int, n_examples: int,
                      pools: tuple[str, ...], why: str, skip: Callable[[str, str], None] | None) -> dict[str, dict]:
    """The ablation check of a model without next-token logits: each labelled task on the last layer's readout of
    its label (:mod:`probes.readout`), the task's own metric being out of reach (``why``)."""
    results = {}
    for task_name in sorted({ev.task for ev in evidence}):
        task = find_task(task_name)
        try:
            if task is None:
                raise InputError("a user task: its readout needs the built-in task's examples")
            examples, _, _, means = ablation_metric(loaded, task, n_examples, mode)
            readout = readout_metric(loaded.model, loaded.tokenizer, task.examples(0), examples)
        except InputError as err:
            (skip or print)(f"ablation of {task_name}", f"{why}, and its readout cannot be fitted: {err}")
            continue
        checks = causal_checks(loaded.model, readout, top_heads(evidence, task_name, k), n_draws=draws, mode=mode,
                               means=means, pools=pools, seed=zlib.crc32(task_name.encode()))
        results[task_name] = {**checks[pools[0]].to_dict(), "metric": READOUT, "n_examples": len(examples),
                              "random_from": {p: r.to_dict() for p, r in checks.items() if p != pools[0]},
                              "probe_after_scored": False, "why_readout": why}
    return results


def ablation_evidence(task: str, result: dict, n_layers: int, n_heads: int) -> Evidence:
    """One task's ablation result (as in ``ablation.json``) as evidence over (layers, heads)."""
    score = np.full((n_layers, n_heads), np.nan)
    null = np.full_like(score, np.nan)
    for layer, head in result["top_heads"]:
        score[layer, head] = result["clean"] - result["top"]
        null[layer, head] = result["clean"] - result["random_pi"][0]
    stage = getattr(find_task(task), "stage", "")
    return Evidence(task, stage, AblationEvidence.name, score, null, list(range(n_layers)),
                    metric=f"drop of {result['metric']} with the top {result['k']} heads ablated",
                    extra={"result": result})


def results_of(evidence: list[Evidence]) -> dict[str, dict]:
    """{task: result} as in ``ablation.json``, from this kind's evidence."""
    return {ev.task: ev.extra["result"] for ev in evidence if ev.source == AblationEvidence.name}


@register_kind
class AblationEvidence(EvidenceKind):
    name = "ablation"
    outputs = ("ablation.json", "ablation.png")
    pooled = False

    def enabled(self, config) -> bool:
        return config.ablate > 0

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        c = inputs.config
        pools = ("all", "layers") if c.random_from == "both" else (c.random_from,)
        loaded = inputs.model
        results = run_ablations(loaded, inputs.evidence, c.ablate, c.ablation, c.draws, c.examples, c.metric, pools,
                                inputs.skip)
        layout = head_layout(loaded.model)
        return [ablation_evidence(task, r, layout.n_layers, layout.n_heads) for task, r in results.items()]

    def section(self, result, folder: Path | None = None, link: str = "") -> str:
        return ablation_section(results_of(result.evidence), folder, link)

    def write(self, result, folder: Path) -> list[Path]:
        path = Path(folder) / "ablation.json"
        path.write_text(json.dumps(results_of(result.evidence), indent=1) + "\n")
        return [path]
