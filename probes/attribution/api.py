"""Attribution as one Python call: checkpoints (+ labelled stores, + the model for checks) -> :class:`Attribution`.

    from headprobe.probes.attribution import AttributionConfig, attribute, write_attribution
    result = attribute(["runs/default/runs"], stores=["runs/default/stores/ioi.h5"],
                       config=AttributionConfig(head_scores=True, ablate=8))
    result.stage_map.top_heads("ICI")           # [(layer, head, score), ...]
    write_attribution(result, "attr")           # stage map PNG/CSV/JSON, each kind's files, report.md

Every registered kind of evidence (:mod:`.evidence`) that the config enables runs in turn: the pooled kinds make the
stage map, then the checks (head types, ablation) read it. ``headprobe attribute`` and ``headprobe run`` are thin
wrappers over these functions.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from headprobe import InputError
from headprobe.probes.attribution.contract import AttributionInputs, kinds
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.result import RESULT_FILE, Attribution, AttributionConfig
from headprobe.probes.attribution.stage_map import StageMap, build_stage_map, markdown_section, write_stage_map
from headprobe.probes.checkpoint import Checkpoint


def find_inputs(paths: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """Checkpoint folders and .h5 stores named by, or found under, ``paths``."""
    checkpoints, stores = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path} does not exist: pass checkpoint folders or a run folder")
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


def _check_one_model(checkpoints: list[Checkpoint], stores: list) -> None:
    """Refuse checkpoints or stores of different models: a store extracted from another model cannot speak for
    these checkpoints (its val rows, labels and latents would belong to other heads)."""
    hashes = {c.config.weights_hash: c.config.model_id for c in checkpoints}
    for store in stores:
        if store.meta.weights_hash not in hashes:
            ours = ", ".join(f"{m} (weights {h})" for h, m in hashes.items())
            raise InputError(f"{store.path} was extracted from {store.meta.model_id} (weights "
                             f"{store.meta.weights_hash}), but the checkpoints come from {ours}: pass stores "
                             f"extracted from the checkpoints' model")


def _model_loader(model: str | None, checkpoints: list[Checkpoint], loaded=None):
    """A function that loads the checkpoints' model (or ``model``) and checks it is the one they were trained on."""
    def load():
        from headprobe.extract.models import load_model

        ids = {c.config.model_id for c in checkpoints}
        if model is None and len(ids) != 1:
            raise InputError(f"checkpoints come from several models ({', '.join(sorted(ids))}): pass --model")
        out = loaded or load_model(model or ids.pop())
        if out.weights_hash not in {c.config.weights_hash for c in checkpoints}:
            raise InputError(f"{out.model_id} (weights {out.weights_hash}) is not the model the checkpoints were "
                             f"trained on: pass that model with --model")
        return out
    return load


def attribute(checkpoints: list[str | Path], stores: list = (), model: str | None = None,
              config: AttributionConfig | None = None, loaded=None) -> Attribution:
    """Every enabled kind of evidence from ``checkpoints`` (folders, or run folders searched for checkpoints and
    stores) and ``stores`` (paths or open Stores), the stage map, then the checks. ``model`` (a name) or ``loaded``
    (a LoadedModel) serves the checks (default: the checkpoints' model)."""
    config = config or AttributionConfig()
    folders, found = find_inputs(list(checkpoints))
    ckpts = [Checkpoint.read(f) for f in folders]
    with _open_stores([*found, *stores]) as opened:
        _check_one_model(ckpts, opened)
        inputs = AttributionInputs(config, ckpts, opened, _model_loader(model, ckpts, loaded))
        evidence: list[Evidence] = []
        seconds: dict[str, float] = {}
        for name, kind in kinds().items():
            if not kind.enabled(config):
                continue
            if not kind.pooled and inputs.stage_map is None:
                inputs.stage_map, inputs.evidence = _pooled_map(evidence, config), list(evidence)
            start = time.perf_counter()
            why = _missing(kind, inputs)
            if why:
                inputs.skip(name, why)
                continue
            evidence += kind.collect(inputs)
            seconds[name] = round(time.perf_counter() - start, 2)
        names = [str(s.path) for s in opened]
    stage_map = inputs.stage_map or _pooled_map(evidence, config)
    return Attribution(config, evidence, stage_map, ckpts[0].config.model_id, [str(c.folder) for c in ckpts], names,
                       seconds, inputs.skipped)


def _missing(kind, inputs: AttributionInputs) -> str | None:
    """Why the model cannot serve ``kind`` (None: it can, or the kind reads no model)."""
    from headprobe.extract.capabilities import capabilities_of

    return capabilities_of(inputs.model).missing(kind.needs) if kind.needs else None


def evidence_from_checkpoints(folders: list[str | Path], stores: list = (), alpha: float = 0.01,
                              max_rows: int = 20000) -> list[Evidence]:
    """The pooled evidence (linear, sparse, SAE, and any other pooled kind) that checkpoint folders give about the
    heads, one per (task, kind); SAEs speak on the labelled ``stores`` (paths or open Stores)."""
    config = AttributionConfig(alpha=alpha, max_rows=max_rows)
    ckpts = [Checkpoint.read(f) for f in folders]
    with _open_stores(stores) as opened:
        _check_one_model(ckpts, opened)
        inputs = AttributionInputs(config, ckpts, opened)
        return [ev for kind in kinds().values() if kind.pooled and kind.enabled(config)
                for ev in kind.collect(inputs)]


@contextmanager
def _open_stores(stores: list):
    """Open Stores for paths (closed on exit); Store objects pass as they are (their owner closes them)."""
    from headprobe.extract.store import Store

    mine, out = [], []
    for s in dict.fromkeys(stores):
        if isinstance(s, Store):
            out.append(s)
        else:
            mine.append(Store(s))
            out.append(mine[-1])
    try:
        yield out
    finally:
        for store in mine:
            store.close()


def _pooled_map(evidence: list[Evidence], config: AttributionConfig) -> StageMap:
    pooled = [ev for ev in evidence if kinds()[ev.source].pooled]
    if not pooled:
        raise InputError("no checkpoint spoke to a task with a stage (KR, ICI, LR, EP); for SAEs pass labelled "
                         "stores with --stores")
    return build_stage_map(pooled, config.reduce, config.scale)


def report_sections(result: Attribution, folder: Path | None = None, link: str = "",
                    stage_image: str | None = "stage_map.png", title: str = "Stage map",
                    skipped: bool = True) -> list[str]:
    """The report's Markdown: the stage map section (headed ``title``), then each kind's (images written into
    ``folder``, linked as ``link + name``), then (with ``skipped``) the checks the model cannot have."""
    sections = [markdown_section(result.stage_map, result.config.top, image=stage_image, title=title)]
    for name, kind in kinds().items():
        if result.of_kind(name):
            text = kind.section(result, folder, link)
            if text:
                sections.append(text)
    return sections + ([skipped_section(result.skipped)] if skipped and result.skipped else [])


def skipped_section(skipped: dict[str, str]) -> str:
    """The checks the model cannot have, each with the reason."""
    rows = [f"| {check} | {why} |" for check, why in skipped.items()]
    return "\n".join(["## Checks this model cannot have", "", "| check | why it was skipped |", "|---|---|", *rows, ""])


OUTPUTS = ("report.md", "stage_map.png", "stage_map.json", "stage_map.md", "stage_scores.csv", RESULT_FILE)  # and
# each kind's own outputs (EvidenceKind.outputs)


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """The files of an attribution already in ``out``, to remove before writing (so that none is left from a run
    with other options); refuse an --out that is a file, or holds an attribution unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder")
    patterns = [*OUTPUTS, *(p for kind in kinds().values() for p in kind.outputs)]
    old = list(dict.fromkeys(p for pattern in patterns for p in sorted(out.glob(pattern)) if p.is_file())) \
        if out.is_dir() else []
    if old and not overwrite:
        raise InputError(f"--out {out} holds an attribution ({old[0].name}): pass --overwrite to replace it, or "
                         f"another --out")
    return old


def write_attribution(result: Attribution, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the stage map (PNG, CSV, JSON, Markdown), each kind's data files, ``report.md`` and the whole result
    as ``attribution.json`` (read back by :meth:`Attribution.load`) into ``out``; returns the paths by name."""
    out = Path(out)
    for path in earlier_outputs(out, overwrite):
        path.unlink()
    paths = write_stage_map(result.stage_map, out, result.config.top)
    for kind in kinds().values():
        if result.of_kind(kind.name):
            paths.update({p.name: p for p in kind.write(result, out)})
    report = out / "report.md"
    report.write_text("# Head attribution\n\n" + "\n".join(report_sections(result, out, "",
                                                                            paths["png"].name)))
    (out / RESULT_FILE).write_text(json.dumps(result.to_json(), default=float) + "\n")
    return {**paths, "report": report, "result": out / RESULT_FILE}
