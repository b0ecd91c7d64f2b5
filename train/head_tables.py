"""Per-head numbers of a run, to download: one table per task and one for the stage map, as CSV and JSON.

Per task, every (layer, head): the linear probe's accuracy on the val split (the split the evidence and the stage
map use) with its 95% Wilson interval, the same on the test split, the selectivity against each control, the
group-lasso norm, the SAE evidence (score and null) where the SAE read the head, the head's attention-pattern
scores, and its stage in the map. The stage map's table: each head's four stage scores, its stage, and every
evidence's score and null.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from headprobe.probes.attribution.result import Attribution
from headprobe.probes.attribution.stage_map import STAGE_AXIS
from headprobe.probes.checkpoint import Checkpoint

Z95 = 1.959963984540054


def wilson(acc: float, n: int | None) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy over ``n`` rows (NaN without ``n``)."""
    if not n or not math.isfinite(acc):
        return math.nan, math.nan
    centre = (acc + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 / (1 + Z95 ** 2 / n) * math.sqrt(acc * (1 - acc) / n + Z95 ** 2 / (4 * n * n))
    return centre - half, centre + half


def _grid(ev, layer: int, head: int) -> tuple[float, float]:
    if layer not in ev.layers:
        return math.nan, math.nan
    i = ev.layers.index(layer)
    return float(ev.score[i, head]), float(ev.null[i, head])


def task_table(task: str, linear: Checkpoint, sparse: Checkpoint | None, result: Attribution) -> list[dict]:
    """One row per (layer, head) of ``task`` (see the module docstring)."""
    config, metrics = linear.config, linear.metrics
    rows_per_split = config.data.get("split_rows", {})
    controls = config.hparams.get("controls") or []
    layers, n_heads = list(config.layers), config.n_heads
    stage_of = result.stage_map.assigned()
    scores = {ev.task: ev for ev in result.of_kind("head_types")}
    sae = next((ev for ev in result.of_kind("sae") if ev.task == task), None)
    norms = np.asarray(sparse.metrics.get("group_norm"), dtype=float) if sparse is not None else None
    out = []
    for i, layer in enumerate(layers):
        for head in range(n_heads):
            row = {"task": task, "layer": layer, "head": head}
            for split in ("val", "test"):
                table = metrics.get(split, {}).get("acc")
                if table is None:
                    continue
                acc = float(np.asarray(table)[0][i][head])
                lo, hi = wilson(acc, rows_per_split.get(split))
                row.update({f"{split}_acc": acc, f"{split}_acc_lo": lo, f"{split}_acc_hi": hi})
                for k, control in enumerate(controls, start=1):
                    row[f"{split}_selectivity_{control}"] = acc - float(np.asarray(table)[k][i][head])
            if norms is not None:
                row["group_norm"] = float(norms[i][head])
            if sae is not None:
                row["sae_score"], row["sae_null"] = _grid(sae, layer, head)
            for name, ev in scores.items():
                row[name] = _grid(ev, layer, head)[0]
            row["stage"] = stage_of.get((layer, head), "")
            out.append(row)
    return out


def stage_table(result: Attribution) -> list[dict]:
    """One row per head of the stage map: its four stage scores, its stage, and every pooled evidence's score and
    null (``task/kind`` and ``task/kind null``)."""
    sm, out = result.stage_map, []
    stage_of = sm.assigned()
    for i, layer in enumerate(sm.layers):
        for head in range(sm.n_heads):
            row = {"layer": layer, "head": head, **{s: float(sm.scores[i, head, k]) for k, s in enumerate(STAGE_AXIS)},
                   "stage": stage_of.get((layer, head), "")}
            for ev in sm.evidence:
                row[f"{ev.task}/{ev.source}"], row[f"{ev.task}/{ev.source} null"] = _grid(ev, layer, head)
            out.append(row)
    return out


def score_table(result: Attribution) -> list[dict]:
    """One row per head with every training-free score of the attribution and its null (``<score> (<its stage>)``
    and ``... null``) and the head's stage in the map; no rows without scores."""
    from headprobe.probes.attribution.kinds.scores import SCORE_SOURCES

    scores = [ev for ev in result.evidence if ev.source in SCORE_SOURCES]
    if not scores:
        return []
    stage_of = result.stage_map.assigned()
    out = []
    for layer in scores[0].layers:
        for head in range(scores[0].score.shape[1]):
            row = {"layer": layer, "head": head}
            for ev in scores:
                name = f"{ev.extra.get('score', ev.task)} ({ev.stage})"
                row[name], row[f"{name} null"] = _grid(ev, layer, head)
            out.append({**row, "stage": stage_of.get((layer, head), "")})
    return out


def write_table(rows: list[dict], path_stem: Path) -> tuple[Path, Path]:
    """``rows`` as ``<stem>.csv`` and ``<stem>.json`` (NaN as an empty cell and as null)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, json_path = path_stem.with_suffix(".csv"), path_stem.with_suffix(".json")
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows([{k: ("" if clean(v) is None else v) for k, v in row.items()} for row in rows])
    json_path.write_text(json.dumps([{k: clean(v) for k, v in row.items()} for row in rows]) + "\n")
    return csv_path, json_path
