"""The evidence contract: every kind of evidence about heads turns into :class:`~.evidence.Evidence` (a score per
head with its null) through one interface, :class:`EvidenceKind`.

A kind reads what it needs of an :class:`AttributionInputs` (checkpoints, labelled stores, the model, and for a
check the evidence pooled so far and its stage map) and returns Evidence. Kinds whose evidence is *pooled*
(linear probes, sparse probes, SAEs) make the stage map; the others are checks reported beside it
(attention-pattern head types, ablations). Adding a kind means one module under ``probes/attribution/kinds/``
with a subclass of :class:`EvidenceKind` decorated by :func:`register_kind` (every module there is imported when
the kinds are listed; docs/architecture.md shows the smallest real example).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from headprobe import InputError
import headprobe.probes.attribution.kinds as builtin
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.result import Attribution, AttributionConfig
from headprobe.probes.attribution.stage_map import StageMap
from headprobe.probes.checkpoint import Checkpoint


@dataclass
class AttributionInputs:
    """What kinds read: checkpoints, labelled stores, the model (loaded on first use), and for checks the pooled
    evidence and the stage map built from it."""

    config: AttributionConfig
    checkpoints: list[Checkpoint] = field(default_factory=list)
    stores: list = field(default_factory=list)  # open headprobe.extract.store.Store objects
    load_model: Callable[[], object] | None = None  # -> headprobe.extract.models.LoadedModel
    evidence: list[Evidence] = field(default_factory=list)
    stage_map: StageMap | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # a check the model cannot have -> why
    _loaded: object = None

    @property
    def model(self):
        """The LoadedModel (model, tokenizer, ids), loaded once, on first use."""
        if self._loaded is None:
            if self.load_model is None:
                raise InputError("this attribution needs the model: pass --model (or model= to attribute())")
            self._loaded = self.load_model()
        return self._loaded

    def skip(self, check: str, why: str) -> None:
        """Record that ``check`` did not run on this model, and why (listed in the report)."""
        self.skipped[check] = why
        print(f"attribute: {check} skipped: {why}")

    def checkpoints_of(self, cls: str) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.config.cls == cls]


class EvidenceKind:
    """A kind of evidence: subclass it, set the class attributes, implement :meth:`collect`, and decorate the class
    with :func:`register_kind`. ``section`` and ``write`` add its part of the report and its data files."""

    name: ClassVar[str] = ""  # the Evidence.source of what it returns
    pooled: ClassVar[bool] = True  # pooled into the stage map; False: a cross-check reported beside it
    reads: ClassVar[str] = ""  # the checkpoint class it reads (CheckpointConfig.cls), if any
    outputs: ClassVar[tuple[str, ...]] = ()  # the files (glob patterns) section() and write() may put in a folder
    needs: ClassVar[tuple[str, ...]] = ()  # what of the model it reads (names of extract.capabilities.NEEDS)

    def enabled(self, config: AttributionConfig) -> bool:
        """Whether this attribution runs the kind (checks are opt-in through the config)."""
        return True

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        raise NotImplementedError

    def section(self, result: Attribution, folder: Path | None = None, link: str = "") -> str:
        """Markdown for the report ("" for none); images go into ``folder``, linked as ``link + name``."""
        return ""

    def write(self, result: Attribution, folder: Path) -> list[Path]:
        """Its data files (CSV/JSON) in ``folder``."""
        return []


KINDS: dict[str, EvidenceKind] = {}
ORDER = ("linear", "sparse", "sae", "head_types", "ablation")  # the built-in kinds' order; others follow by name


def register_kind(cls: type[EvidenceKind]) -> type[EvidenceKind]:
    """Class decorator: make a kind of evidence known to :func:`headprobe.probes.attribution.attribute`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name: the Evidence.source of what it returns")
    KINDS[cls.name] = cls()
    return cls


def kinds() -> dict[str, EvidenceKind]:
    """Every registered kind (every module of ``probes/attribution/kinds/`` is imported first): pooled kinds before
    checks, the probes' kinds first."""
    for module in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{module.name}")
    rank = lambda name: (not KINDS[name].pooled, ORDER.index(name) if name in ORDER else len(ORDER), name)  # noqa: E731
    return {name: KINDS[name] for name in sorted(KINDS, key=rank)}
