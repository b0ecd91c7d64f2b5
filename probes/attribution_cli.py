"""``headprobe attribute``: trained probes and SAEs -> heads -> reasoning stages, with modeling-free cross-checks.

    headprobe attribute runs/default --out runs/default/attribution
    headprobe attribute ckpt/linear-capitals ckpt/sae-l15 --stores capitals.h5 --out attr --head-scores --ablate 8

Writes into ``--out``: ``stage_map.png``, ``stage_scores.csv``, ``stage_map.json``, ``stage_map.md`` and
``report.md``; with ``--head-scores`` also ``head_types.csv`` (attention-pattern scores of every head), the
Spearman rho of every evidence against them and ``induction_check.png`` (the copy task's evidence against the
induction scores); with ``--ablate K`` ``ablation.json`` (each task's top-K heads
mean-ablated against K random heads from all layers and layer-matched ones, with CIs, on the task's model metric
and, for true/false statements, on the last layer's readout of the label, see :mod:`probes.readout`).
"""
from __future__ import annotations

import argparse
import csv
import json
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from headprobe import InputError
from headprobe.probes.attribution import Evidence, evidence_from_checkpoints
from headprobe.probes.stage_map import SCALES, STAGES, build_stage_map, markdown_section, write_stage_map


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="checkpoint folders, or run folders to search for checkpoints "
                                                        "and stores")
    p.add_argument("--out", type=Path, required=True, help="folder for the stage map and the report")
    p.add_argument("--stores", nargs="*", type=Path, default=[],
                   help="labelled HDF5 stores to tie SAE latents to tasks")
    p.add_argument("--alpha", type=_level, default=0.01, help="family-wise level of the nulls (Bonferroni over heads)")
    p.add_argument("--top", type=int, default=8, help="heads listed per stage in the report")
    p.add_argument("--reduce", choices=["mean", "max"], default="mean", help="pooling over a stage's evidence")
    p.add_argument("--scale", choices=SCALES, default="share",
                   help="each evidence's excess over its null divided by its total (share: a head's share of what "
                        "the task found) or by its largest (max: how close a head comes to the task's best head)")
    p.add_argument("--head-scores", action="store_true", help="also score previous-token, duplicate-token and "
                                                                 "induction heads from attention patterns")
    p.add_argument("--ablate", type=int, default=0, metavar="K", help="ablate each task's top-K heads against K "
                                                                       "random heads (true/false statement tasks "
                                                                       "also on the last layer's readout)")
    p.add_argument("--ablation", choices=["mean", "zero"], default="mean")
    p.add_argument("--draws", type=_at_least_two, default=10, help="random-head draws per task (at least 2)")
    p.add_argument("--random-from", choices=["all", "layers", "both"], default="both",
                   help="where the random heads come from: all layers, layer-matched to the top heads "
                        "(as many per layer), or both (two rows)")
    p.add_argument("--examples", type=int, default=64, help="task examples per ablation metric")
    p.add_argument("--metric", choices=["auto", "accuracy"], default="auto",
                   help="ablation metric: auto = the continuous one (choice: log-prob margin of the right answer; "
                        "induction: log-prob of copied tokens), accuracy = the share the model gets right (readout "
                        "rows always use the readout's log-probability)")
    p.add_argument("--model", default=None, help="model for the cross-checks (default: the checkpoints' model)")
    p.add_argument("--overwrite", action="store_true", help="replace the attribution in an --out that holds one")


OUTPUTS = ("report.md", "stage_map.png", "stage_map.json", "stage_map.md", "stage_scores.csv", "head_types.csv",
           "induction_check.png", "ablation.json", "ablation.png")  # what `headprobe attribute` may write to --out


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """The files of an attribution already in ``out``, to remove before writing (so that none is left from a run
    with other options); refuse an --out that is a file, or holds an attribution unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder")
    old = [out / name for name in OUTPUTS if (out / name).exists()]
    if old and not overwrite:
        raise InputError(f"--out {out} holds an attribution ({old[0].name}): pass --overwrite to replace it, or "
                         f"another --out")
    return old


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a level between 0 and 1, such as 0.01")
    return value


def _at_least_two(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: the prediction interval needs at least 2 random draws")
    return int(text)


def find_inputs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Checkpoint folders and .h5 stores named by, or found under, ``paths``."""
    checkpoints, stores = [], []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass checkpoint folders or a run folder")
        if path.is_file() and path.suffix == ".h5":
            stores.append(path)
        elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            checkpoints.append(path)
        elif path.is_dir():
            checkpoints += sorted(c.parent for c in path.rglob("model.safetensors")
                                  if (c.parent / "config.json").is_file())
            stores += sorted(path.rglob("*.h5"))
    if not checkpoints:
        raise InputError(f"no checkpoint found in {', '.join(map(str, paths))}: pass folders holding config.json and "
                         f"model.safetensors (train some with `headprobe train`)")
    return checkpoints, stores


def task_ranking(evidence: list[Evidence], task: str) -> tuple[list[int], np.ndarray]:
    """(layers, (L, H) ranking score) of one task: mean over its evidence of excess / max excess, with the raw
    score (scaled to [0, 1e-3]) breaking ties among heads below the null."""
    mine = [ev for ev in evidence if ev.task == task]
    layers = sorted({layer for ev in mine for layer in ev.layers})
    total = np.zeros((len(layers), mine[0].score.shape[1]))
    for ev in mine:
        rows = [layers.index(layer) for layer in ev.layers]
        ex = ev.excess()
        s = np.nan_to_num(ev.score, nan=np.nanmin(ev.score))
        span = s.max() - s.min()
        total[rows] += (ex / ex.max() if ex.max() > 0 else ex) + 1e-3 * ((s - s.min()) / span if span > 0 else 0)
    return layers, total / len(mine)


def top_heads(evidence: list[Evidence], task: str, k: int) -> list[tuple[int, int]]:
    layers, score = task_ranking(evidence, task)
    order = np.argsort(-score, axis=None, kind="stable")[:k]
    return [(layers[i], int(h)) for i, h in zip(*np.unravel_index(order, score.shape))]


TOP_SHARED = 8


def head_type_section(scores: dict[str, np.ndarray], evidence: list[Evidence], stage_map,
                      folder: Path | None = None) -> str:
    """The report's cross-check section; with ``folder``, also ``induction_check.png`` for the copy tasks."""
    from headprobe.extract.tasks import TASKS
    from headprobe.probes.head_scores import (
        HEAD_TYPE_STAGE,
        TYPE_THRESHOLD,
        copy_carriers,
        head_types,
        plot_against_pattern,
        rank_agreement,
        top_overlap,
        typed_auroc,
    )

    out = ["## Attention-pattern cross-check", "",
           f"Scores on [BOS, r1..r50, r1..r50] (TransformerLens 'mul' score; a head is typed above {TYPE_THRESHOLD}). "
           "The survey puts previous-token and duplicate-token heads in ICI and induction heads in LR.", "",
           "| head | type(s) | scores (prev / dup / ind) | taxonomy stage | stage in the map |",
           "|---|---|---|---|---|"]
    typed = head_types(scores)
    for (layer, head), types in sorted(typed.items()):
        vals = " / ".join(f"{scores[t][layer, head]:.2f}" for t in ("previous_token", "duplicate_token", "induction"))
        got = ""
        if layer in stage_map.layers:
            d = stage_map.dominant[stage_map.layers.index(layer), head]
            got = STAGES[d] if d >= 0 else "none"
        out.append(f"| L{layer}.H{head} | {', '.join(types)} | {vals} | "
                   f"{', '.join(sorted({HEAD_TYPE_STAGE[t] for t in types}))} | {got} |")
    out += ["", "Spearman rho over heads between each evidence's score and the pattern scores, how many of the "
            f"evidence's top {TOP_SHARED} heads are among the top {TOP_SHARED} induction heads, and how well the "
            f"evidence separates the heads typed induction from the rest (AUROC over its heads; 0.5: not at all):", "",
            f"| evidence | stage | previous-token | duplicate-token | induction | induction top-{TOP_SHARED} shared "
            "| induction-typed AUROC |", "|---|---|---|---|---|---|---|"]
    for ev in evidence:
        rows = ev.layers
        rhos = [rank_agreement(ev.score, scores[t][rows]) for t in ("previous_token", "duplicate_token", "induction")]
        few = np.size(ev.score) < 4 * TOP_SHARED  # e.g. an SAE on one layer: its top 8 of 9 heads would be trivial
        shared = "-" if few else f"{top_overlap(ev.score, scores['induction'][rows], TOP_SHARED)}/{TOP_SHARED}"
        auroc = "-" if few else f"{typed_auroc(ev.score, scores['induction'][rows]):.2f}"
        out.append(f"| {ev.task}/{ev.source} | {ev.stage} | " + " | ".join(f"{r:.2f}" for r in rhos)
                   + f" | {shared} | {auroc} |")
    copying = [ev for ev in evidence if getattr(TASKS.get(ev.task), "metric", "") == "induction" and len(ev.layers) > 1]
    if folder is not None and copying:
        panels = [(f"{ev.task}/{ev.source}" + (f" ({ev.metric})" if ev.metric else ""), ev.score, ev.layers)
                  for ev in copying]
        plot_against_pattern(scores["induction"], panels, Path(folder) / "induction_check.png")
        out += ["", "Each head of the copy task's evidence against its induction score (colour: layer):", "",
                "![copy task against induction scores](induction_check.png)", ""]
        for ev in copying:
            above = np.where(ev.excess() > 0, ev.score, np.nan)
            n, m, first = copy_carriers(above, ev.layers, scores["induction"], 2 * TOP_SHARED)
            if first is not None and m:
                out.append(f"- {ev.task}/{ev.source}: {n} of its top {m} heads above the null sit after layer "
                           f"{first} (the first with an induction head) and score <= {TYPE_THRESHOLD} on induction"
                           + (". They carry the copied token without an induction pattern (read, e.g., from the "
                              "residual stream the induction heads wrote to): a probe counts them, the attention "
                              "pattern does not, and rho drops." if n else "."))
    return "\n".join(out + [""])


def _interval(pi) -> str:
    return "-" if pi is None else f"[{pi[0]:.3f}, {pi[1]:.3f}]"  # absent in an older ablation.json


def _shared(c: dict) -> str:
    """Mean number of top heads in a random draw, of k (a layer-matched draw may take some)."""
    if not c.get("random_heads"):
        return "-"  # absent in an older ablation.json
    top = {tuple(h) for h in c["top_heads"]}
    return f"{np.mean([len(top & {tuple(h) for h in d}) for d in c['random_heads']]):.1f}/{len(top)}"


def ablation_section(results: dict[str, dict], folder: Path | None = None) -> str:
    """The ablation table (and, given a ``folder``, ``ablation.png`` written there and shown above the table)."""
    out = ["## Causal check: ablating each task's top heads", ""]
    if not results:
        return "\n".join(out + ["No task with a model metric was ablated.", ""])
    from headprobe.probes.ablation import metric_rows
    from headprobe.probes.readout import READOUT

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
        from headprobe.probes.ablation import plot_ablation

        plot_ablation(results, Path(folder) / "ablation.png")
        out += ["![ablation: top heads against random heads](ablation.png)", ""]
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
                    metric: str = "auto") -> tuple[list, str, Callable[[object], np.ndarray], "torch.Tensor | None"]:
    """What the ablation check of ``task`` runs: (its ``n_examples`` examples, the metric's name, ``metric(model)``
    -> one value per example, the heads' mean z (L, H, D) on those examples for mean ablation, else None)."""
    from headprobe.extract.tasks.metrics import example_ids, model_metric, right_padded
    from headprobe.probes.ablation import head_means

    examples = task.examples(0)
    pick = np.sort(np.random.default_rng(0).choice(len(examples), min(n_examples, len(examples)), replace=False))
    examples = [examples[i] for i in pick]
    ids = [example_ids(loaded.tokenizer, ex) for ex in examples]
    means = head_means(loaded.model, [right_padded(ids)]) if mode == "mean" else None
    key = CONTINUOUS.get(task.metric, "metric") if metric == "auto" else "metric"
    return examples, key, lambda m: model_metric(loaded, task, examples)[key], means


def run_ablations(loaded, evidence: list[Evidence], k: int, mode: str, draws: int, n_examples: int,
                  metric: str = "auto", pools: tuple[str, ...] = ("all", "layers")) -> dict[str, dict]:
    """Each task's top-k heads ablated against k random heads from each of ``pools`` (see
    :func:`probes.ablation.draw_random_heads`; the random draws are seeded by the task's name): the first pool's
    result, with the others' under ``random_from``. Where the probes read a token after the scored one (true/false
    statements), the same heads are also checked on the last layer's readout of the label (``readout``, see
    :mod:`probes.readout`)."""
    from headprobe.extract.tasks import TASKS
    from headprobe.extract.tasks.metrics import probe_reads_after_scoring
    from headprobe.probes.ablation import causal_checks
    from headprobe.probes.readout import READOUT, readout_metric

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
        task = TASKS.get(task_name)
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


def run(args: argparse.Namespace) -> None:
    from headprobe.extract.store import Store
    earlier = earlier_outputs(args.out, args.overwrite)
    checkpoints, found = find_inputs(args.paths)
    stores = [Store(p) for p in dict.fromkeys(found + list(args.stores))]
    evidence = evidence_from_checkpoints(checkpoints, stores, args.alpha)
    print(f"attribute: {len(checkpoints)} checkpoints, {len(stores)} stores: "
          f"{', '.join(f'{e.task}/{e.source}' for e in evidence) or 'no labelled task'}")
    if not evidence:
        raise InputError("no checkpoint spoke to a task with a stage (KR, ICI, LR, EP); for SAEs pass labelled "
                         "stores with --stores")
    stage_map = build_stage_map(evidence, args.reduce, args.scale)
    for path in earlier:
        path.unlink()
    paths = write_stage_map(stage_map, args.out, args.top)
    report = [markdown_section(stage_map, args.top, image=paths["png"].name)]
    if args.head_scores or args.ablate:
        from headprobe.extract.models import load_model

        loaded = load_model(args.model or _model_of(checkpoints))
        hashes = {json.loads((c / "config.json").read_text())["weights_hash"] for c in checkpoints}
        if loaded.weights_hash not in hashes:
            raise InputError(f"{loaded.model_id} (weights {loaded.weights_hash}) is not the model the checkpoints were "
                             f"trained on: pass that model with --model")
        if args.head_scores:
            from headprobe.probes.head_scores import HEAD_TYPES, head_type_scores

            scores = head_type_scores(loaded.model)
            with open(args.out / "head_types.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["layer", "head", *HEAD_TYPES])
                for layer in range(scores["induction"].shape[0]):
                    for head in range(scores["induction"].shape[1]):
                        w.writerow([layer, head, *(f"{scores[t][layer, head]:.4f}" for t in HEAD_TYPES)])
            report.append(head_type_section(scores, evidence, stage_map, args.out))
        if args.ablate:
            pools = ("all", "layers") if args.random_from == "both" else (args.random_from,)
            results = run_ablations(loaded, evidence, args.ablate, args.ablation, args.draws, args.examples,
                                    args.metric, pools)
            (args.out / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
            report.append(ablation_section(results, args.out))
    (args.out / "report.md").write_text("# Head attribution\n\n" + "\n".join(report))
    print(f"attribute: {len(stage_map.assigned())} heads with a stage; report in {args.out / 'report.md'}")


def _model_of(checkpoints: list[Path]) -> str:
    ids = {json.loads((c / "config.json").read_text())["model_id"] for c in checkpoints}
    if len(ids) != 1:
        raise InputError(f"checkpoints come from several models ({', '.join(sorted(ids))}): pass --model")
    return ids.pop()
