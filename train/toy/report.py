"""The toy training's part of a report: the phase-change plot, the heads' final scores and jobs, and single-head
ablations; as a page of its own (``headprobe toy report``) or as a section of ``headprobe run``'s report (through
the ``toy_training`` evidence kind)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from headprobe import InputError
from headprobe.train.toy import check, record

SCORES = ("previous_token", "duplicate_token", "induction", "copy", "successor", "head_norm")


def scores_table(rec: dict) -> str:
    """Markdown: every head's final scores, and the job it does (its score for the job above the threshold)."""
    final = {k: np.asarray(v) for k, v in rec["curves"][-1]["scores"].items()}
    jobs = {(j["layer"], j["head"]): name for name, j in rec["job_heads"].items() if j["done"]}
    lines = ["| head | job | " + " | ".join(s.replace("_", "-") for s in SCORES) + " |",
             "|---|---|" + "---|" * len(SCORES)]
    for (layer, head), _ in np.ndenumerate(final["head_norm"]):
        cells = " | ".join(f"{final[s][layer, head]:.2f}" for s in SCORES)
        lines.append(f"| L{layer}.H{head} | {jobs.get((layer, head), '').replace('_', '-')} | {cells} |")
    return "\n".join(lines)


def toy_sections(rec: dict, ablations: dict | None, folder: Path | None, link: str = "") -> str:
    """The Markdown section (``## Toy model training``); with ``folder``, ``phase_change.png`` is drawn there and
    linked as ``link + name``."""
    model, data = rec["model"], rec["data"]
    losses = ", ".join(f"{k} {v:.3f}" for k, v in rec["final_loss"].items())
    out = ["## Toy model training", "",
           f"Task `{rec['task']}` ({rec['description']}); probing task `{rec['probing_task']}`. "
           f"{model['n_layers']} layers x {model['n_heads']} heads, d_model {model['d_model']}, "
           f"{'attention-only' if model['attn_only'] else 'with MLPs'}; {rec['steps']} steps of "
           f"{data['batch_size']} x {data['seq_len']} tokens in {rec['seconds']:.0f} s; final loss on the evaluation "
           f"batch: {losses}."
           + (f" The loss on the repeated half fell at step {rec['phase_change_step']} (first checkpoint with the "
              f"second copy's loss below half the first's)." if rec.get("phase_change_step") is not None else ""),
           ""]
    if folder is not None:
        record.plot_phase_change(rec, Path(folder) / "phase_change.png")
        out += [f"![phase change: loss and head scores against the training step]({link}phase_change.png)", ""]
    jobs = "; ".join(f"{name.replace('_', '-')}: L{j['layer']}.H{j['head']} ({j['score']:.2f}, "
                     f"{'above' if j['done'] else 'not above'} {record.JOB_THRESHOLD})"
                     for name, j in rec["job_heads"].items())
    out += [f"The task leaves its heads these jobs (best head, final score): {jobs}. Final scores of every head "
            "(attention patterns on [BOS, r1..r50, r1..r50]; copy and successor: the head's OV circuit on the "
            "token embeddings; head-norm: its weight norm):", "", scores_table(rec), ""]
    if ablations is not None:
        out += [f"Each head {ablations['mode']}-ablated alone, loss on the task's evaluation batch"
                + (" (in-context drop: first copy's loss minus the second's)" if "second" in ablations["clean"]
                   else "") + ":", "", check.ablation_table(ablations, rec["job_heads"]), ""]
    return "\n".join(out)


def toy_report(model: str | Path, out: str | Path | None = None) -> Path:
    """``headprobe toy report``: the section above as a page (``index.html`` and ``report.md`` in ``out``, default
    MODEL/report); returns the page."""
    from headprobe.extract.models import load_model
    from headprobe.train.report import write_report

    folder = Path(model)
    rec = record.read_record(folder) if folder.is_dir() else None
    if rec is None:
        raise InputError(f"{folder} holds no {record.RECORD_FILE}: pass the model folder a `headprobe toy train` "
                         f"wrote (OUT/model)")
    loaded = load_model(str(folder))
    ablations = check.head_ablations(loaded.model, rec["task"], rec["data"]["seed"])
    out = Path(out) if out is not None else folder / "report"
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    page = write_report(tmp, f"Toy model: {rec['task']}", [toy_sections(rec, ablations, tmp / "img", "img/")])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / page.name
