"""Files and report Markdown of the training-free scores (:mod:`.scores`): ``scores.csv`` (one row per head, each
score and its null), ``scores.json`` (everything, read back by :func:`load_scores`), one layer x head heatmap per
score (``score_<name>.png``) and a Markdown section: what each score is, its heatmap, its top heads with their
taxonomy stage (and stage in the map, when there is one), the retrieval task's accuracy, the model's own answers to
the binary questions, and how the scores agree with the probes where both speak about the same heads.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.checks.head_scores import rank_agreement, top_overlap
from headprobe.probes.checks.scores import SOURCE_POOLED

TOP = 10
SHARED = 8


def _name(ev: Evidence) -> str:
    return ev.extra.get("score", ev.task.removesuffix("_score"))


def write_table(evidence: list[Evidence], path: Path) -> Path:
    """``path`` (CSV): layer, head, then each score and its null."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", *(c for ev in evidence for c in (_name(ev), f"{_name(ev)}_null"))])
        L, H = evidence[0].score.shape
        for layer in range(L):
            for head in range(H):
                w.writerow([layer, head, *(f"{a[layer, head]:.6g}" for ev in evidence for a in (ev.score, ev.null))])
    return path


def _clean(x):
    """JSON-able: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if np.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def plot_score(ev: Evidence, path: Path) -> Path:
    """Layer x head heatmap of one score; heads above the null are ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = ev.score.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.42 * H, 1.2 + 0.26 * L))
    finite = ev.score[np.isfinite(ev.score)]
    span = max(abs(finite.min()), abs(finite.max())) if finite.size else 1.0
    signed = finite.size and finite.min() < 0
    im = ax.imshow(ev.score, aspect="auto", origin="lower", interpolation="nearest",
                   cmap="RdBu_r" if signed else "viridis", vmin=-span if signed else 0, vmax=span or 1)
    rows, cols = np.nonzero(ev.score > ev.null)
    ax.scatter(cols, rows, s=40, facecolors="none", edgecolors="white" if not signed else "black", linewidths=0.9)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{_name(ev)} ({ev.stage}); ringed: above the null", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_scores(evidence: list[Evidence], folder: str | Path, meta: dict | None = None) -> list[Path]:
    """``scores.csv``, ``scores.json`` and ``score_<name>.png`` per score in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_table(evidence, folder / "scores.csv")]
    payload = {**(meta or {}), "evidence": [ev.to_json() for ev in evidence]}
    (folder / "scores.json").write_text(json.dumps(_clean(payload), indent=1) + "\n")
    paths.append(folder / "scores.json")
    paths += [plot_score(ev, folder / f"score_{_name(ev)}.png") for ev in evidence]
    return paths


def load_scores(folder: str | Path) -> list[Evidence]:
    """The evidence :func:`write_scores` wrote into ``folder``."""
    data = json.loads((Path(folder) / "scores.json").read_text())
    return [Evidence.from_json(e) for e in data["evidence"]]


def top_rows(ev: Evidence, stage_map=None, k: int = TOP) -> list[str]:
    """Markdown rows of the ``k`` highest-scoring heads: head, score, null, taxonomy stage, stage in the map."""
    from headprobe.probes.attribution.stage_map import STAGE_AXIS

    s = np.nan_to_num(ev.score, nan=-np.inf)
    rows = []
    for flat in np.argsort(-s, axis=None, kind="stable")[:k]:
        layer, head = np.unravel_index(flat, s.shape)
        got = "-"
        if stage_map is not None and layer in stage_map.layers:
            d = stage_map.dominant[stage_map.layers.index(layer), head]
            got = STAGE_AXIS[d] if d >= 0 else "none"
        mark = "above" if ev.score[layer, head] > ev.null[layer, head] else "below"
        rows.append(f"| L{layer}.H{head} | {ev.score[layer, head]:.3f} | {ev.null[layer, head]:.3f} ({mark}) | "
                    f"{ev.stage} | {got} |")
    return rows


def retrieval_lines(details: dict) -> list[str]:
    """The needle task's own accuracy: overall and by length and depth."""
    acc = details.get("accuracy")
    if not acc:
        return []
    out = [f"The model on the needle task ({acc['prompts']} prompts): teacher-forced, it predicts "
           f"{acc['teacher_token_accuracy']:.1%} of the answers' tokens ({acc['teacher_exact']:.1%} of answers "
           f"whole); generating, {acc['generate_success']:.1%} of its answers hold more than half of the needle's "
           f"answer tokens (mean recall {acc['generate_recall']:.2f}). The evidence is the "
           f"`{details['variant']}` variant; the paper's threshold is {details['threshold']}.", "",
           "| length | depth | prompts | teacher-forced token accuracy | generated: answers retrieved |",
           "|---|---|---|---|---|"]
    out += [f"| {c['length']} | {c['depth']:g} | {c['prompts']} | {c['teacher_token_accuracy']:.2f} | "
            f"{c['generate_success']:.2f} |" for c in acc["by_length_depth"]]
    return out + [""]


def negative_lines(details: dict) -> list[str]:
    a = details.get("answers")
    if not a:
        return []
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"  # noqa: E731
    return [f"The model's own answers to the {a['questions']} binary questions: accuracy {fmt(a['accuracy'])}, "
            f"\"No\" in {fmt(a['no_rate'])} of them, precision of \"Yes\" {fmt(a['yes_precision'])} and recall "
            f"{fmt(a['yes_recall'])} (negative bias: recall below precision).", ""]


def agreement_lines(scores: list[Evidence], probes: list[Evidence]) -> list[str]:
    """Spearman rho over heads between each probe evidence and each score, and how many of the probe's top
    ``SHARED`` heads are among the score's top ``SHARED`` (over the heads both speak about)."""
    probes = [ev for ev in probes if np.size(ev.score) >= 4 * SHARED]  # an SAE on one layer ranks too few heads
    if not probes or not scores:
        return []
    out = ["Agreement with the probes where both speak (Spearman rho over the heads of the probe's layers; in "
           f"brackets, shared heads among both top {SHARED}; -: a probe that ranks no head, e.g. a sparse probe "
           "that kept none):", "",
           "| evidence | stage | " + " | ".join(_name(s) for s in scores) + " |", "|---|---|" + "---|" * len(scores)]
    for ev in probes:
        rhos = [rank_agreement(ev.score, s.score[ev.layers]) for s in scores]
        cells = ["-" if np.isnan(rho) else f"{rho:.2f} ({top_overlap(ev.score, s.score[ev.layers], SHARED)})"
                 for rho, s in zip(rhos, scores)]
        out.append(f"| {ev.task}/{ev.source} | {ev.stage} | " + " | ".join(cells) + " |")
    return out + [""]


def scores_section(evidence: list[Evidence], stage_map=None, probes: list[Evidence] = (),
                   folder: Path | None = None, link: str = "") -> str:
    """The report's section on the scores; with ``folder``, each score's heatmap is written there and linked as
    ``link + name``."""
    out = ["## Training-free head scores", "",
           "Scores computed from the model alone (docs/scores.md gives each formula and its reference). Pooled: "
           "joins the probes' evidence in the stage map; the others are checks. A head is above the null where its "
           "score exceeds it.", "",
           "| score | stage | pooled | what it measures | heads above the null | seconds |", "|---|---|---|---|---|---|"]
    for ev in evidence:
        above = int((ev.score > ev.null).sum())
        out.append(f"| {_name(ev)} | {ev.stage} | {'yes' if ev.source == SOURCE_POOLED else 'no'} | {ev.metric} | "
                   f"{above} of {ev.score.size} | {ev.extra.get('seconds', '-')} |")
    out.append("")
    for ev in evidence:
        name = _name(ev)
        out += [f"### {name}", ""]
        if folder is not None:
            plot_score(ev, Path(folder) / f"score_{name}.png")
            out += [f"![{name} scores]({link}score_{name}.png)", ""]
        out += retrieval_lines(ev.extra.get("details", {})) if name == "retrieval" else []
        out += negative_lines(ev.extra.get("details", {})) if name == "negative" else []
        if not np.isfinite(ev.score).any():
            out += ["No score: the model answered none of the needle prompts (the `generate` variant counts "
                    "answered prompts only; `teacher` scores every prompt).", ""]
            continue
        out += [f"Top {TOP} heads:", "", "| head | score | null | taxonomy stage | stage in the map |",
                "|---|---|---|---|---|", *top_rows(ev, stage_map), ""]
    return "\n".join(out + agreement_lines(evidence, list(probes)))
