"""What a steering sweep (:mod:`.steer`) writes: the long table (``steer.csv``), the whole result (``steer.json``),
a plot of effect and side effect against alpha (``steer.png``) and a report section (``steer.md``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from headprobe import InputError
from headprobe.probes.checks.steer import CONDITIONS, SteerResult

FILES = ("steer.csv", "steer.json", "steer.png", "steer.md")
COLOURS = {"probe": "#c0392b", "random_direction": "#8c8c8c", "random_heads": "#3b75af"}
LABELS = {"probe": "probe's heads and directions", "random_direction": "same heads, random directions",
          "random_heads": "random heads, their own directions"}
PLOTTED = ("margin", "readout_label1")  # behaviour metrics shown in the plot (share_label1 is in the table)


def long_rows(results: dict[str, SteerResult]) -> list[dict]:
    """One row per task, metric and steered setting (K, alpha, condition, draw), with the change from clean."""
    out = []
    for task, r in results.items():
        for row in r.rows:
            for metric, value in row.values.items():
                out.append({"task": task, "metric": metric, "k": row.k, "alpha": row.alpha,
                            "condition": row.condition, "draw": row.draw, "value": value,
                            "change": value - r.clean[metric], "ce": row.ce, "ce_change": row.ce - r.ce_clean,
                            "kl": row.kl})
    return out


def write_csv(results: dict[str, SteerResult], path: Path) -> Path:
    rows = long_rows(results)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _band(ax, alphas: list[float], values: np.ndarray, colour: str, label: str, floor: float | None = None) -> None:
    """Mean over draws (line) and one draw's 95% prediction interval (band, cut at ``floor``); ``values`` (alphas,
    draws)."""
    from headprobe.probes.checks.ablation import t_interval

    pis = np.array([t_interval(v, one_draw=True) for v in values])
    pis = pis if floor is None else np.maximum(pis, floor)
    ax.fill_between(alphas, pis[:, 0], pis[:, 1], color=colour, alpha=0.18, linewidth=0)
    ax.plot(alphas, values.mean(1), color=colour, marker="o", markersize=3, label=label)


def _panel(ax, r: SteerResult, k: int, metric: str | None) -> None:
    """One task's ``metric`` change (None: KL) against alpha, the probe and both controls."""
    alphas = r.alphas
    for cond in CONDITIONS:
        grid = [[(row.kl if metric is None else row.values[metric] - r.clean[metric])
                 for row in r.rows if row.k == k and row.alpha == a and row.condition == cond] for a in alphas]
        values = np.array(grid, dtype=float)
        if cond == "probe":
            ax.plot(alphas, values[:, 0], color=COLOURS[cond], marker="D", markersize=4, label=LABELS[cond],
                    zorder=3)
        else:
            _band(ax, alphas, values, COLOURS[cond], LABELS[cond], floor=0.0 if metric is None else None)
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_xlabel("alpha")
    ax.tick_params(labelsize=7)


def plot_steer(results: dict[str, SteerResult], path: str | Path) -> Path:
    """One row per (task, K): the change of each plotted behaviour metric, and the KL from the clean model on
    corpus text, against alpha; the probe's heads against both controls (mean and one draw's 95% interval)."""
    if not results:
        raise InputError("no steering results to plot: sweep at least one task")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, r, k) for task, r in results.items() for k in r.ks]
    metrics = [m for m in PLOTTED if any(m in r.metrics for r in results.values())]
    fig, axes = plt.subplots(len(panels), len(metrics) + 1, figsize=(3.3 * (len(metrics) + 1), 2.5 * len(panels)),
                             squeeze=False)
    for row, (task, r, k) in zip(axes, panels):
        for ax, metric in zip(row, [*metrics, None]):
            if metric is not None and metric not in r.metrics:
                ax.axis("off")
                continue
            _panel(ax, r, k, metric)
            what = "KL(clean || steered), corpus" if metric is None else f"{metric} change"
            ax.set_title(f"{task}, K={k}: {what}", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pi(c: dict) -> str:
    return f"{c['mean']:+.3f} [{c['pi'][0]:+.3f}, {c['pi'][1]:+.3f}]"


def summary_rows(results: dict[str, SteerResult], alphas: list[float] | None = None) -> list[dict]:
    """:meth:`SteerResult.summary` for every task, K, steered alpha (or ``alphas``) and metric."""
    return [{"task": task, **r.summary(k, a, m)} for task, r in results.items() for k in r.ks
            for a in (alphas or [a for a in r.alphas if a != 0]) if a in r.alphas for m in r.metrics]


INTRO = ("Inference-time intervention (Li et al. 2023): each of a task's top K heads by probe val accuracy gets "
         "`alpha * sigma * theta` added to its output z before W_O, theta its unit {direction} direction and sigma "
         "the std of the training activations along it, at {where}. Effect: the change of the behaviour metric on "
         "held-out examples (alpha > 0 steers towards label 1). Controls at each alpha, {draws} draws each: the "
         "same heads along random directions with the same shift norm, and K random heads (all layers, the top "
         "ones left out) along their own directions. **Beats both**: the probe's change lies above the 95% "
         "prediction interval of one draw of each control. Side effect: the change of next-token cross-entropy "
         "(CE) on held-out corpus text ({tokens} tokens) and KL(clean || steered) there, with the same steering.")


def steer_section(results: dict[str, SteerResult], folder: Path | None = None, link: str = "",
                  alphas: list[float] | None = None, title: str = "Steering along probe directions") -> str:
    """Markdown: the method in brief, the plot (written into ``folder`` as ``steer.png``), the summary table and
    a plain count of where steering beats its controls."""
    out = [f"## {title}", ""]
    if not results:
        return "\n".join(out + ["No task was steered (steering needs a two-class choice task with its store).", ""])
    first = next(iter(results.values()))
    out += [INTRO.format(direction=first.direction.replace("_", "-"), draws=first.draws, tokens=first.n_tokens,
                         where="every position" if first.position == "all" else "each sequence's last token"), ""]
    if folder is not None:
        plot_steer(results, Path(folder) / "steer.png")
        out += [f"![steering: effect and side effect against alpha]({link}steer.png)", ""]
    rows = summary_rows(results, alphas)
    out += [("| task | metric | K | alpha | clean | probe: change | random directions: mean [one draw's 95% PI] | "
             "random heads: mean [one draw's 95% PI] | beats both | CE change | KL |"), "|---" * 11 + "|"]
    for s in rows:
        out.append(f"| {s['task']} | {s['metric']} | {s['k']} | {s['alpha']:g} | {s['clean']:.3f} | "
                   f"{s['probe']:+.3f} | {_pi(s['random_direction'])} | {_pi(s['random_heads'])} | "
                   f"{'yes' if s['beats_both'] else 'no'} | {s['ce']:+.3f} | {s['kl']:.3f} |")
    out += ["", verdict(results, rows), ""]
    out += [f"- {task}: " + "; ".join(f"{m}: {d}" for m, d in r.metrics.items()) for task, r in results.items()]
    return "\n".join(out + [""])


def verdict(results: dict[str, SteerResult], rows: list[dict]) -> str:
    """One plain sentence per task on whether steering beat both controls on its main metric (the margin)."""
    parts = []
    for task in results:
        mine = [s for s in rows if s["task"] == task and s["metric"] == "margin"]
        wins = [s for s in mine if s["beats_both"]]
        where = ", ".join(f"K={s['k']} alpha={s['alpha']:g}" for s in wins)
        parts.append(f"{task}: the margin beats both controls at {len(wins)} of {len(mine)} settings"
                     + (f" ({where})." if wins else "."))
    return "**Does steering beat its controls?** " + " ".join(parts)


def write_steer(results: dict[str, SteerResult], folder: str | Path) -> dict[str, Path]:
    """Every file of :data:`FILES` into ``folder`` (created); returns them by name. The JSON is written last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"steer.csv": write_csv(results, folder / "steer.csv")}
    (folder / "steer.md").write_text(steer_section(results, folder) + "\n")
    paths.update({"steer.png": folder / "steer.png", "steer.md": folder / "steer.md"})
    path = folder / "steer.json"
    path.write_text(json.dumps({t: r.to_dict() for t, r in results.items()}, indent=1, default=float) + "\n")
    paths["steer.json"] = path
    return paths
