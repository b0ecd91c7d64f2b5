"""The run report: one folder with ``report.md`` and the same content as ``index.html`` (opens offline).

Stages contribute Markdown sections (tables, images as PNG files in the folder); the page is rendered with the
``markdown`` library and records on ``<body>`` how many of its images loaded, so a headless browser can check it.
:func:`run_report` composes ``headprobe run``'s page from the pipeline's results (the Attribution object, each
training's metrics, the SAE's evaluation).
"""
from __future__ import annotations

import platform
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import markdown


class RunState(Protocol):
    """What the run's report reads of the pipeline (:class:`headprobe.train.pipeline.Pipeline`)."""

    cfg: object  # RunConfig
    tasks: list
    out: Path
    sae_dir: Path
    attribution: object  # Attribution
    sae_eval: dict
    steps: object  # Steps
    loaded: object  # LoadedModel, for the SAE latents' tokens

    def run_dir(self, kind: str, name: str) -> Path: ...

    def store(self, name: str) -> Path: ...

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}"
        ".toc{background:#fafafa;border:1px solid #eee;padding:.5em 1em;font-size:14px}")
_IMAGE_CHECK = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
                "document.body.dataset.imagesTotal=i.length;"
                "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>")


def images_in(text: str) -> list[str]:
    """Relative image paths referenced by Markdown ``text``."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)


def write_report(folder: str | Path, title: str, sections: list[str]) -> Path:
    """Write ``report.md`` and ``index.html`` into ``folder``; every referenced image must exist there."""
    folder = Path(folder)
    text = f"# {title}\n\n[TOC]\n\n" + "\n\n".join(s.strip() + "\n" for s in sections)
    missing = [p for p in images_in(text) if not (folder / p).is_file()]
    if missing:
        raise FileNotFoundError(f"report images missing in {folder}: {', '.join(missing)}")
    (folder / "report.md").write_text(text.replace("[TOC]\n\n", ""))
    body = markdown.markdown(text, extensions=["tables", "toc", "fenced_code"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body>{body}{_IMAGE_CHECK}</body></html>")
    (folder / "index.html").write_text(page)
    return folder / "index.html"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("headprobe", "torch", "lightning", "transformers", "h5py", "scikit-learn", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _copy(src: Path, folder: Path, name: str) -> str:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / "img" / name)
    return f"img/{name}"


def _probe_table(p: RunState) -> str:
    from headprobe.train.fit import FitResult

    rows = ["| task | stage | rows | best head (val acc) | mean val acc | max selectivity (control task / shuffled "
            "labels) | heads kept by group lasso |", "|---|---|---|---|---|---|---|"]
    for t in p.tasks:
        linear = FitResult.load(p.run_dir("linear", t.name), "linear")
        heads = linear.head_table()
        best = max(heads, key=lambda h: h.get("val/acc", 0))
        sel = [max(h.get(f"val/selectivity_{c}", float("nan")) for h in heads) for c in ("control", "shuffled")]
        # read at one token type (e.g. always the prompt's last word), the control task has one label: no baseline
        # (training skips it and says so; runs from before that fitted it to accuracy 1)
        one_label = "control" in linear.metrics.get("controls_skipped", {}) or min(h.get("val/acc_control", 0)
                                                                                    for h in heads) > 0.999
        control = "n/a" if one_label else f"{sel[0]:.3f}"
        kept = len(FitResult.load(p.run_dir("sparse", t.name), "sparse").metrics["selected_heads"])
        mean = sum(h["val/acc"] for h in heads) / len(heads)
        rows.append(f"| {t.name} | {t.stage} | {_rows(p.store(t.name))} | L{best['layer']}.H{best['head']} "
                    f"({best['val/acc']:.3f}) | {mean:.3f} | {control} / {sel[1]:.3f} | {kept} |")
    note = ("\n\nn/a: every row of the task is read at one token type, so its control task has one label and gives "
            "no baseline (training skips it; shuffled labels remain).")
    return "\n".join(rows) + (note if any(" | n/a / " in r for r in rows) else "")


def _top_tokens(p: RunState, n_features: int = 8, n_tokens: int = 5, context: int = 6) -> str:
    """The SAE latents with the largest decoder share on the stage map's top heads, with their top tokens."""
    import numpy as np
    import torch

    from headprobe.extract.store import Store
    from headprobe.probes.sae import decoder_head_shares
    from headprobe.probes.checkpoint import load_local

    sae = load_local(p.sae_dir / "checkpoint")
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


def run_report(p: RunState) -> Path:
    """The run's report page (``report/index.html`` and ``report.md``) from the pipeline's results."""
    from headprobe.probes.attribution.api import report_sections, skipped_section

    folder = p.out / "report"
    attr = p.out / "attribution"
    result = p.attribution
    stage_png = _copy(attr / "stage_map.png", folder, "stage_map.png")
    (folder / "img").mkdir(parents=True, exist_ok=True)
    attribution_md = "\n".join(report_sections(result, folder / "img", "img/", stage_image=None,
                                                title="Top heads per stage and their evidence", skipped=False))
    skipped = {**p.skipped, **result.skipped}
    sections = [
        f"Model `{p.cfg.model}`; {len(p.tasks)} tasks over the four reasoning stages of Zheng et al. (2024). Each "
        f"head's output z was probed per task (linear probes for every head at once, a group-lasso probe choosing "
        f"heads), a {SAE_NAMES.get(p.cfg.sae.architecture, p.cfg.sae.architecture)} sparse autoencoder was trained on "
        f"layer {p.cfg.sae.layer}, and the evidence was pooled into a stage per head, then checked against "
        f"attention-pattern scores and by ablating each task's top heads.",
        f"## Stage map\n\n![stage map]({stage_png})",
        *([skipped_section(skipped)] if skipped else []),
        demote(attribution_md),
        "## Probes per task\n\n" + _probe_table(p),
        "## Per-task probe accuracy (each head's linear probe on the val split, the split the evidence and the "
        "stage map use)\n\n" + "\n\n".join(_val_heatmap(p, t.name, folder) for t in p.tasks),
        "## Per-head numbers\n\n" + _tables(p, result, folder),
    ]
    sae_dir = p.sae_dir
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
                    "\n\n```\n" + p.steps.table() + "\n```\n\n" + _kind_times(result) + "Command: `"
                    + " ".join(["headprobe", *sys.argv[1:]]) + "`")
    return write_report(folder, "headprobe report", sections)


def _val_heatmap(p: RunState, task: str, folder: Path) -> str:
    """The task's per-head val accuracy as a layer x head heatmap in ``folder/img``; its Markdown image."""
    import numpy as np

    from headprobe.probes.checkpoint import Checkpoint
    from headprobe.train.callbacks import heatmap

    ckpt = Checkpoint.read(p.run_dir("linear", task) / "checkpoint")
    acc = np.asarray(ckpt.metrics["val"]["acc"], dtype=float)[0]  # (L, H): the task's label set
    n = ckpt.config.data.get("split_rows", {}).get("val")
    (folder / "img").mkdir(parents=True, exist_ok=True)
    heatmap(acc, folder / "img" / f"heatmap_{task}.png", f"{task}: val accuracy" + (f" ({n} rows)" if n else ""),
            list(ckpt.config.layers))
    return f"![{task}](img/heatmap_{task}.png)"


def _tables(p: RunState, result, folder: Path) -> str:
    """Write every task's per-head table and the stage map's into ``folder/data`` (CSV and JSON); the links."""
    from headprobe.probes.checkpoint import Checkpoint
    from headprobe.train.head_tables import score_table, stage_table, task_table, write_table

    data = folder / "data"
    lines = ["Every head's numbers, to plot in your own tools (val and test accuracy with 95% Wilson intervals, "
             "selectivity per control, group-lasso norm, SAE evidence, attention-pattern scores, stage):", ""]
    write_table(stage_table(result), data / "stage_map")
    lines.append("- stage map (every head's four stage scores, its stage and every evidence): "
                 "[CSV](data/stage_map.csv), [JSON](data/stage_map.json)")
    scores = score_table(result)
    if scores:
        write_table(scores, data / "scores")
        lines.append("- training-free scores (every head's score and null, each score's stage in its column): "
                     "[CSV](data/scores.csv), [JSON](data/scores.json)")
    for t in p.tasks:
        linear = Checkpoint.read(p.run_dir("linear", t.name) / "checkpoint")
        sparse_dir = p.run_dir("sparse", t.name) / "checkpoint"
        sparse = Checkpoint.read(sparse_dir) if sparse_dir.exists() else None
        write_table(task_table(t.name, linear, sparse, result), data / f"heads_{t.name}")
        lines.append(f"- {t.name} ({t.stage}): [CSV](data/heads_{t.name}.csv), [JSON](data/heads_{t.name}.json)")
    return "\n".join(lines)


def _kind_times(result) -> str:
    """The attribute step's time per kind of evidence, as a sentence."""
    if not result.seconds:
        return ""
    parts = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in result.seconds.items())
    return f"The attribute step's time by kind of evidence: {parts}.\n\n"


def demote(markdown: str) -> str:
    """Every heading one level down (``## x`` -> ``### x``), for a section nested in the run's report."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.M)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def _rows(path: Path) -> int:
    from headprobe.extract.store import Store

    with Store(path) as store:
        return len(store)
