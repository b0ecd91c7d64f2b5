"""Training-free head scores as evidence: retrieval (Wu et al. 2024), negative attention (Yu et al. 2024), OV
copying (Elhage et al. 2021; Olsson et al. 2022), succession (Gould et al. 2023) and the attention-pattern head
types (previous-token, duplicate-token, induction; Olsson et al. 2022), each an (L, H) score with its null and the
stage the survey's taxonomy gives the head type (Zheng et al. 2024):

| score | stage | pooled into the stage map | null |
|---|---|---|---|
| retrieval | ICI (retrieval heads: overall structure) | yes | max(0.1, the score with shuffled answers) |
| negative | KR (negative heads: binary decisions) | yes | sign-flip threshold, unrelated word pairs |
| successor | LR (successor heads: task-specific) | yes | random heads' scores (Bonferroni) |
| copying | ICI (our choice: movers, whose OV circuits copy) | no | random heads' scores (Bonferroni) |
| induction, previous_token, duplicate_token | LR, ICI, ICI | no | the type threshold 0.4 |

Pooled scores join the probes' evidence in the stage map when an attribution names them
(``AttributionConfig.scores``); the others are checks reported beside it (copying marks a mechanism shared by
movers, induction and retrieval heads rather than one stage; the pattern types already have their own check).
``ScoreConfig.pooled`` (``AttributionConfig.pool_scores``) makes that choice. :func:`compute_scores` is what ``headprobe scores`` and the
attribution kinds (:mod:`headprobe.probes.attribution.kinds.scores`) call; the formulas are in each score's module
(:mod:`.retrieval`, :mod:`.negative`, :mod:`.ov_scores`, :mod:`.head_scores`) and docs/scores.md.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from headprobe import InputError
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.checks.head_scores import HEAD_TYPES, TYPE_THRESHOLD

STAGE = {"retrieval": "ICI", "negative": "KR", "successor": "LR", "copying": "ICI", "induction": "LR",
         "previous_token": "ICI", "duplicate_token": "ICI"}
DEFAULT_POOLED = ("retrieval", "negative", "successor")  # scores that join the stage map unless told otherwise
SOURCE_POOLED, SOURCE_CHECK = "scores", "score_checks"  # the attribution kinds' names (Evidence.source)
METRIC = {
    "retrieval": "retrieval score: share of the needle's answer tokens the head copy-pastes (Wu et al. 2024)",
    "negative": "negative attention score: attention to the candidates x log(No / Yes) (Yu et al. 2024)",
    "successor": "succession score: share of ordinal tokens whose OV output ranks the successor first "
                 "(Gould et al. 2023)",
    "copying": "copying score: positive share of the OV circuit's eigenvalues (Elhage et al. 2021)",
    **{t: f"{t.replace('_', '-')} attention-pattern score ('mul', TransformerLens)" for t in HEAD_TYPES},
}
DEFAULT_SCORES = ("retrieval", "negative", "copying", "successor", "induction")
NEEDS = {"retrieval": ("causal_lm",), "negative": ("causal_lm",), "copying": ("causal_lm",),
         "successor": ("causal_lm",), **{t: ("attentions",) for t in HEAD_TYPES}}  # what each reads of the model
PLACEBO_QUESTIONS = 32  # binary questions per unrelated word pair (the negative score's null)


class ScoreSkipped(Exception):
    """A score this model cannot have (its reason is the message): reported, not raised to the user."""


@dataclass
class ScoreConfig:
    """Settings of :func:`compute_scores` (``headprobe scores`` options of the same names).

    Args:
        scores: which scores (names of ``STAGE``)
        alpha: family-wise level of the nulls (Bonferroni over heads)
        lengths, depths, needles: the needle prompts (tokens, fraction of the haystack before the needle, how many
            of the shipped needles); every combination is scored
        retrieval: which retrieval variant is the evidence: generate (the paper's) or teacher (teacher-forced)
        questions: binary questions for the negative score (a multiple of 4: true/false x both candidate orders)
        batch_size: prompts per forward pass
        seed: haystacks, questions, shuffles and random heads
        pooled: which scores are stage evidence pooled into the stage map (the others are checks beside it)
    """

    scores: list[str] = field(default_factory=lambda: list(DEFAULT_SCORES))
    alpha: float = 0.01
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    needles: int = 4
    retrieval: str = "generate"
    questions: int = 128
    batch_size: int = 4
    seed: int = 0
    pooled: list[str] = field(default_factory=lambda: list(DEFAULT_POOLED))

    def __post_init__(self) -> None:
        unknown = [s for s in self.scores if s not in STAGE]
        if unknown or not self.scores:
            raise InputError(f"--scores {','.join(self.scores)}: unknown {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(STAGE)}")
        if self.retrieval not in ("generate", "teacher"):
            raise InputError(f"--retrieval {self.retrieval}: choose generate or teacher")
        if not 0 < self.alpha < 1 or self.batch_size < 1:
            raise InputError(f"--alpha {self.alpha}, --batch_size {self.batch_size}: pass a level between 0 and 1 "
                             f"and a batch size of 1 or more")


@dataclass
class ScoreResult:
    """Every computed score as Evidence (task ``<score>_score``), with what each measured and its time, and the
    scores this model cannot have with the reason (``skipped``: name -> why)."""

    config: ScoreConfig
    evidence: list[Evidence]
    model_id: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def of(self, name: str) -> Evidence:
        return next(ev for ev in self.evidence if ev.task == f"{name}_score")

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "model_id": self.model_id, "seconds": self.seconds,
                "skipped": self.skipped, "evidence": [ev.to_json() for ev in self.evidence]}


def score_evidence(name: str, score: np.ndarray, null, details: dict | None = None) -> Evidence:
    """A score (L, H) as Evidence of its stage (a check until :func:`compute_scores` says it is pooled)."""
    source = SOURCE_CHECK
    return Evidence(f"{name}_score", STAGE[name], source, score, null, list(range(score.shape[0])),
                    metric=METRIC[name], extra={"score": name, "details": details or {}})


def _retrieval(loaded, cfg: ScoreConfig) -> Evidence:
    from headprobe.extract.tasks.needle import needle_prompts
    from headprobe.probes.checks.retrieval import THRESHOLD, retrieval_scores

    lengths = _fitting_lengths(loaded, cfg)
    prompts = needle_prompts(loaded.tokenizer, lengths, cfg.depths, cfg.needles, cfg.seed)
    r = retrieval_scores(loaded.model, prompts, cfg.batch_size, _eos(loaded), cfg.seed)
    score, shuffled = (r.generate, r.generate_null) if cfg.retrieval == "generate" else (r.teacher, r.teacher_null)
    details = {"variant": cfg.retrieval, "lengths": lengths, "threshold": THRESHOLD, "accuracy": r.accuracy,
               "teacher": r.teacher.tolist(), "generate": r.generate.tolist(), "teacher_null": r.teacher_null.tolist(),
               "generate_null": r.generate_null.tolist(), "prompts": r.prompts}
    return score_evidence("retrieval", score, np.maximum(THRESHOLD, np.nan_to_num(shuffled)), details)


def _fitting_lengths(loaded, cfg: ScoreConfig) -> list[int]:
    """``cfg.lengths`` that hold a needle and fit the model's context; :class:`ScoreSkipped` if none does."""
    from headprobe.extract.tasks.needle import shortest_length

    shortest = shortest_length(loaded.tokenizer, cfg.needles)
    context = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None) or float("inf")
    lengths = [n for n in cfg.lengths if shortest <= n <= context]
    if not lengths:
        raise ScoreSkipped(f"no needle length in {cfg.lengths} lies between the shortest needle prompt ({shortest} "
                           f"tokens) and the model's context ({context})")
    return lengths


def _eos(loaded) -> int | None:
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _negative(loaded, cfg: ScoreConfig) -> Evidence:
    from headprobe.extract.tasks.yes_no import PLACEBO_WORDS, binary_questions
    from headprobe.probes.checks.negative import negative_scores

    questions = binary_questions(loaded.tokenizer, cfg.questions, cfg.seed)
    n_placebo = min(cfg.questions, PLACEBO_QUESTIONS)
    placebos = {f"{a.strip()}/{b.strip()}": binary_questions(loaded.tokenizer, n_placebo, cfg.seed, words=(a, b))
                for a, b in PLACEBO_WORDS}
    r = negative_scores(loaded.model, questions, placebos, max(cfg.batch_size, 16), cfg.alpha)
    return score_evidence("negative", r.score, r.null, {"answers": r.answers, "questions": len(questions),
                                                        "placebo_questions": n_placebo})


def _ov(loaded, cfg: ScoreConfig, names: list[str]) -> list[Evidence]:
    from headprobe.probes.checks.ov_scores import copying_scores, ordinal_tokens, ov_nulls, ov_weights, \
        successor_scores

    w = ov_weights(loaded.model)
    sequences = ordinal_tokens(loaded.tokenizer) if "successor" in names else None
    nulls = ov_nulls(w, sequences, cfg.alpha, seed=cfg.seed)
    out = []
    if "copying" in names:
        out.append(score_evidence("copying", copying_scores(w), nulls["copying"]["threshold"],
                                  {"random_heads": nulls["copying"]}))
    if "successor" in names:
        seqs = {k: len(v[0]) for k, v in sequences.items()}
        out.append(score_evidence("successor", successor_scores(w, sequences), nulls["successor"]["threshold"],
                                  {"random_heads": nulls["successor"], "sequences": seqs}))
    return out


def _pattern(loaded, cfg: ScoreConfig, names: list[str]) -> list[Evidence]:
    from headprobe.probes.checks.head_scores import head_type_scores

    scores = head_type_scores(loaded.model, seed=cfg.seed)
    return [score_evidence(t, scores[t], TYPE_THRESHOLD) for t in names]


def unsupported(loaded, name: str) -> str | None:
    """Why the model of ``loaded`` cannot have score ``name`` (None: it can)."""
    from headprobe.extract.capabilities import capabilities_of
    from headprobe.probes.checks.ov_scores import OV_SPECS

    why = capabilities_of(loaded).missing(NEEDS[name])
    kind = loaded.model.config.model_type
    if why is None and name in ("copying", "successor") and kind not in OV_SPECS:
        why = f"the OV-circuit scores know the blocks of {', '.join(sorted(OV_SPECS))}, not of {kind}"
    return why


def compute_scores(loaded, config: ScoreConfig | None = None) -> ScoreResult:
    """Every score ``config.scores`` names that the model can have, for a LoadedModel (``.model``, ``.tokenizer``):
    a :class:`ScoreResult` with one Evidence per score, the seconds each took, and why any other was skipped."""
    cfg = config or ScoreConfig()
    early = {n: why for n in dict.fromkeys(cfg.scores) if (why := unsupported(loaded, n))}
    names = [n for n in dict.fromkeys(cfg.scores) if n not in early]
    runs = [(["retrieval"], lambda: [_retrieval(loaded, cfg)]), (["negative"], lambda: [_negative(loaded, cfg)]),
            ([n for n in names if n in ("copying", "successor")], lambda: _ov(loaded, cfg, names)),
            ([n for n in names if n in HEAD_TYPES], lambda: _pattern(loaded, cfg, [n for n in names if n in HEAD_TYPES]))]
    evidence, seconds, skipped = [], {}, dict(early)
    for group, run in runs:
        if not any(n in names for n in group):
            continue
        start = time.perf_counter()
        try:
            evidence += run()
        except ScoreSkipped as why:
            skipped.update({n: str(why) for n in group if n in names})
            continue
        seconds["+".join(n for n in group if n in names)] = round(time.perf_counter() - start, 2)
    evidence.sort(key=lambda ev: names.index(ev.extra["score"]))
    for ev in evidence:
        ev.extra["seconds"] = next(s for k, s in seconds.items() if ev.extra["score"] in k.split("+"))
        ev.source = SOURCE_POOLED if ev.extra["score"] in cfg.pooled else SOURCE_CHECK
    return ScoreResult(cfg, evidence, getattr(loaded, "model_id", ""), seconds, skipped)
