"""The stage map: every head's importance for each of the four reasoning stages, from all tasks and artifacts.

Each :class:`~headprobe.probes.attribution.evidence.Evidence` (one task, one artifact) gives a head score and a null.
Its excess over the null is scaled so that accuracies, group norms and SAE shares can be pooled, by one of

- ``share`` (default): the excess divided by the evidence's total excess, i.e. each head's share of what the task
  found, times the fraction of the map's heads the evidence covers (an SAE on one of 30 layers carries 1/30 of the
  weight of a probe on all of them). A task decodable from almost every head spreads thin and weighs little on any
  one of them; a task found in a few heads weighs on those.
- ``max``: the excess divided by the evidence's largest excess, i.e. how close a head comes to the task's best
  head. A task decodable from almost every head weighs fully on all of them (on SmolLM2, sentiment then paints
  every late head EP).

A stage's score is the mean (or max) over the evidences of the stage's tasks, divided by the largest score of the
map so that the best head scores 1. A head with no excess over any null gets no stage; otherwise its dominant stage
is the one with the largest score.

Outputs: a layer x head grid PNG (colour = dominant stage, intensity = score), ``stage_scores.csv`` and
``stage_map.json``, and a Markdown section listing the top heads of each stage with their evidence.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headprobe import InputError
from headprobe.extract.tasks.base import STAGES
from headprobe.probes.attribution.evidence import Evidence, scaled_excess

STAGE_AXIS = tuple(STAGES)  # the stage map's last axis: ("KR", "ICI", "LR", "EP")
COLOURS = {"KR": "#1f77b4", "ICI": "#ff7f0e", "LR": "#2ca02c", "EP": "#d62728"}


@dataclass
class StageMap:
    layers: list[int]  # model layer of each row
    scores: np.ndarray  # (L, H, 4) in [0, 1], stage order STAGE_AXIS
    evidence: list[Evidence]
    scale: str = "share"  # how each evidence was scaled before pooling (see build_stage_map)
    reduce: str = "mean"  # how a stage's evidences were pooled

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def dominant(self) -> np.ndarray:
        """(L, H) index into STAGE_AXIS of each head's dominant stage, -1 for a head with nothing above the null."""
        return np.where(self.scores.max(-1) > 0, self.scores.argmax(-1), -1)

    def assigned(self) -> dict[tuple[int, int], str]:
        """{(layer, head): stage} for every head that has a stage."""
        dom = self.dominant
        return {(self.layers[i], h): STAGE_AXIS[dom[i, h]] for i, h in zip(*np.nonzero(dom >= 0))}

    def top_heads(self, stage: str, k: int = 8) -> list[tuple[int, int, float]]:
        """Up to ``k`` heads with the highest (non-zero) score for ``stage``: (layer, head, score)."""
        s = self.scores[..., STAGE_AXIS.index(stage)]
        order = np.argsort(-s, axis=None, kind="stable")[:k]
        return [(self.layers[i], int(h), float(s[i, h])) for i, h in zip(*np.unravel_index(order, s.shape))
                if s[i, h] > 0]

    def evidence_for(self, layer: int, head: int, stage: str) -> list[str]:
        """One line per evidence of ``stage`` on this head: 'task/source: score (null)'."""
        out = []
        for ev in self.evidence:
            if ev.stage == stage and layer in ev.layers:
                i = ev.layers.index(layer)
                mark = ">" if ev.score[i, head] > ev.null[i, head] else "<="
                out.append(f"{ev.task}/{ev.source}: {ev.score[i, head]:.3g} {mark} null {ev.null[i, head]:.3g}")
        return out


SCALES = ("share", "max")
SCALE_WORDS = {"share": "total (times the share of heads it covers)", "max": "largest excess"}


def build_stage_map(evidence: list[Evidence], reduce: str = "mean", scale: str = "share") -> StageMap:
    """Pool evidences into (L, H, 4) stage scores in [0, 1] over the union of their layers; ``reduce``: mean or max
    over a stage's evidences; ``scale``: share or max (see the module's docstring)."""
    if scale not in SCALES:
        raise InputError(f"unknown scale {scale!r}: choose {' or '.join(SCALES)}")
    if not evidence:
        raise InputError("no evidence to build a stage map from: pass at least one trained probe or SAE")
    bad = sorted({ev.stage for ev in evidence} - set(STAGE_AXIS))
    if bad:
        raise InputError(f"unknown stage(s) {bad}: tasks must carry one of {', '.join(STAGE_AXIS)}")
    heads = {ev.score.shape[1] for ev in evidence}
    if len(heads) != 1:
        raise InputError(f"evidence comes from models with different head counts {sorted(heads)}: attribute one "
                         f"model at a time")
    n_heads = heads.pop()
    layers = sorted({layer for ev in evidence for layer in ev.layers})
    per_stage: dict[str, list[np.ndarray]] = {s: [] for s in STAGE_AXIS}
    for ev in evidence:
        full = np.zeros((len(layers), n_heads))
        full[[layers.index(layer) for layer in ev.layers]] = scaled_excess(ev, scale, full.size)
        per_stage[ev.stage].append(full)
    pool = {"mean": np.mean, "max": np.max}[reduce]
    scores = np.stack([pool(per_stage[s], axis=0) if per_stage[s] else np.zeros((len(layers), n_heads))
                       for s in STAGE_AXIS], axis=-1)
    return StageMap(layers, scores / scores.max() if scores.max() > 0 else scores, list(evidence), scale, reduce)


def plot_stage_grid(stage_map: StageMap, path: str | Path, title: str = "Reasoning stage of each head") -> Path:
    """Layer x head grid: colour = dominant stage, intensity = its score; blank = no stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    L, H = len(stage_map.layers), stage_map.n_heads
    dom = stage_map.dominant
    rgb = np.ones((L, H, 3))
    for si, stage in enumerate(STAGE_AXIS):
        mask = dom == si
        a = 0.2 + 0.8 * stage_map.scores[..., si][mask][:, None]
        rgb[mask] = (1 - a) + a * np.array(to_rgb(COLOURS[stage]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * H, 1.2 + 0.28 * L))
    ax.imshow(rgb, aspect="auto", interpolation="nearest", origin="lower")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L), [str(layer) for layer in stage_map.layers], fontsize=7)
    ax.set_xticks(np.arange(-0.5, H), minor=True)
    ax.set_yticks(np.arange(-0.5, L), minor=True)
    ax.grid(which="minor", color="#ddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=COLOURS[s], label=f"{s}: {STAGES[s]}") for s in STAGE_AXIS]
    handles.append(Patch(facecolor="white", edgecolor="#999", label="no stage (nothing above the null)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, ncol=1, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_scores(stage_map: StageMap, folder: str | Path) -> tuple[Path, Path]:
    """``stage_scores.csv`` (one row per head) and ``stage_map.json`` (scores, stages and every evidence)."""
    folder = Path(folder)
    dom = stage_map.dominant
    csv_path, json_path = folder / "stage_scores.csv", folder / "stage_map.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", *STAGE_AXIS, "stage"])
        for i, layer in enumerate(stage_map.layers):
            for h in range(stage_map.n_heads):
                w.writerow([layer, h, *(f"{v:.6g}" for v in stage_map.scores[i, h]),
                            STAGE_AXIS[dom[i, h]] if dom[i, h] >= 0 else ""])
    payload = {
        "stages": list(STAGE_AXIS), "layers": stage_map.layers, "n_heads": stage_map.n_heads,
        "scale": stage_map.scale, "reduce": stage_map.reduce,
        "scores": stage_map.scores.tolist(),
        "stage": [[STAGE_AXIS[d] if d >= 0 else None for d in row] for row in dom.tolist()],
        "evidence": [ev.to_json() for ev in stage_map.evidence],
    }
    json_path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return csv_path, json_path


def markdown_section(stage_map: StageMap, k: int = 8, image: str | None = "stage_map.png",
                     title: str = "Stage map") -> str:
    """The report's section: the grid, then the top ``k`` heads of each stage with their evidence."""
    out = [f"## {title}", ""]
    tasks = sorted({(ev.stage, ev.task) for ev in stage_map.evidence}, key=lambda t: (STAGE_AXIS.index(t[0]), t[1]))
    sources = sorted({ev.source for ev in stage_map.evidence})
    out += [f"Tasks: {', '.join(f'{t} ({s})' for s, t in tasks)}. Artifacts: {', '.join(sources)}. "
            f"{len(stage_map.assigned())} of {stage_map.scores[..., 0].size} heads are above the null for some "
            f"stage. Scores: each evidence's excess over its null scaled by its {SCALE_WORDS[stage_map.scale]}, "
            f"the {stage_map.reduce} over a stage's evidences, 1 for the best head.", ""]
    if image:
        out += [f"![stage map]({image})", ""]
    for stage in STAGE_AXIS:
        top = stage_map.top_heads(stage, k)
        out += [f"### {stage}: {STAGES[stage]}", ""]
        if not top:
            out += ["No head above the null" + ("" if any(ev.stage == stage for ev in stage_map.evidence)
                                                 else " (no task of this stage was attributed)") + ".", ""]
            continue
        out += ["| head | score | dominant stage | evidence (score vs null) |", "|---|---|---|---|"]
        for layer, head, score in top:
            d = stage_map.dominant[stage_map.layers.index(layer), head]
            out.append(f"| L{layer}.H{head} | {score:.3f} | {STAGE_AXIS[d]} | "
                       f"{'; '.join(stage_map.evidence_for(layer, head, stage))} |")
        out.append("")
    return "\n".join(out)


def write_stage_map(stage_map: StageMap, folder: str | Path, k: int = 8) -> dict[str, Path]:
    """Write the grid PNG, CSV, JSON and ``stage_map.md`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot_stage_grid(stage_map, folder / "stage_map.png")
    csv_path, json_path = write_scores(stage_map, folder)
    md = folder / "stage_map.md"
    md.write_text(markdown_section(stage_map, k, image=png.name) + "\n")
    return {"png": png, "csv": csv_path, "json": json_path, "markdown": md}
