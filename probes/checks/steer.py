"""Does steering along probe directions change what the model does, more than steering anywhere else would?

:func:`steer_sweep` builds the ITI intervention (:mod:`headprobe.probes.steering`) from a task's probe checkpoint
and training store, and for every K and alpha measures

- the effect: the task's behaviour with the shift added, on examples held out from the directions' fit (the
  store's val and test rows). For a ``choice`` task, ``margin`` is the log-probability margin of the answer that
  label 1 gives (steering moves towards label 1 for alpha > 0) and ``share_label1`` the share of questions answered
  so. On true/false statements (the probe reads the answer token, label 1 = true) label 1's answer is the right
  one, and ``readout_label1`` adds the last layer's log-probability that the statement is true, read as in the
  ablation check (:mod:`.readout`);
- the side effect: the next-token cross-entropy on held-out corpus text (the corpus task's test documents) and the
  KL divergence from the unsteered model's predictions there, KL(clean || steered), mean over tokens;

for the probe's heads along their directions and two controls at each alpha: the same heads along random unit
directions with the same shift norm (``random_direction``), and K random heads (from all layers, the top ones left
out) along their own directions with their own sigma (``random_heads``), each drawn ``draws`` times (fixed across
alphas). Steering *beats* a control where its value lies above the 95% prediction interval of one draw.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from headprobe import InputError
from headprobe.extract.hooks import head_layout
from headprobe.extract.tasks import TASKS, assign_splits
from headprobe.extract.tasks.metrics import choice_metric, example_ids, probe_reads_after_scoring, right_padded
from headprobe.probes.checks.ablation import draw_random_heads, t_interval
from headprobe.probes.steering import (HeadSteering, build_intervention, head_ranking, open_probe, probe_directions,
                                       projection_std, shift_table)

CONDITIONS = ("probe", "random_direction", "random_heads")
ALPHAS = (0.0, 1.0, 2.0, 5.0, 10.0)


# --- the behaviour metric ----------------------------------------------------------------------------------------
@dataclass
class Behaviour:
    """What the sweep measures on a task: ``names`` (metric -> what it means) and ``measure()`` -> {metric: mean}
    with whatever hooks are on the model."""

    names: dict[str, str]
    measure: object  # () -> dict[str, float]
    n_examples: int


def _towards_label1(loaded, examples: list) -> dict[str, float]:
    """Margin and share of answers of label 1's answer, over questions whose label decides the answer (two
    candidates): a label-0 question's margin counts negated."""
    parts = [(sign, choice_metric(loaded, exs)) for sign, exs in
             ((1, [e for e in examples if e.label == 1]), (-1, [e for e in examples if e.label == 0])) if exs]
    n = sum(r["n"] for _, r in parts)
    margin = sum(sign * r["margin"] * r["n"] for sign, r in parts) / n
    share = sum((r["metric"] if sign > 0 else 1 - r["metric"]) * r["n"] for sign, r in parts) / n
    return {"margin": float(margin), "share_label1": float(share)}


def behaviour(loaded, task, examples: list, all_examples: list | None = None) -> Behaviour:
    """The steering metrics of a binary ``choice`` task on ``examples`` (see the module docstring);
    ``all_examples`` (default: the task's) train the readout of true/false statements."""
    if task.metric != "choice" or len(task.label_names) != 2:
        raise InputError(f"task {task.name!r}: steering is measured on two-class tasks whose examples ask the model "
                         f"a choice (metric 'choice'; this one: {task.metric!r}, labels {task.label_names})")
    one = task.label_names[1]
    if probe_reads_after_scoring(task, examples):
        names = {"margin": f"log-prob margin of the right answer (label 1, {one!r}, says the statement is right)",
                 "share_label1": "share of questions answered right",
                 "readout_label1": f"last layer's readout: log-probability of {one!r} for the statements"}
        from headprobe.probes.checks.readout import readout_metric

        readout = readout_metric(loaded.model, loaded.tokenizer, all_examples or task.examples(0), examples)
        y = np.array([int(e.label) for e in examples])

        def measure() -> dict[str, float]:
            r = choice_metric(loaded, examples)
            lp = readout(loaded.model)  # log-probability of each statement's own label
            true = np.where(y == 1, lp, np.log1p(-np.exp(np.minimum(lp, -1e-12))))
            return {"margin": r["margin"], "share_label1": r["metric"], "readout_label1": float(true.mean())}
        return Behaviour(names, measure, len(examples))
    if any(e.choice is None or len(e.choice["candidates"]) != 2 for e in examples):
        raise InputError(f"task {task.name!r}: steering towards label 1 needs two answer candidates per question")
    names = {"margin": f"log-prob margin of the answer label 1 ({one!r}) gives over label 0's answer",
             "share_label1": f"share of questions given label 1's ({one!r}) answer"}
    return Behaviour(names, lambda: _towards_label1(loaded, examples), len(examples))


def held_out_examples(task, store, n_examples: int, seed: int = 0) -> list:
    """Up to ``n_examples`` of the task's examples whose rows in ``store`` are val or test (not used to fit the
    directions), a seeded sample in task order."""
    examples = task.examples(int(store.meta.config.get("seed", 0)))
    split, ids = store.column("split"), store.column("example_id")
    held = np.unique(ids[split != 0])
    if len(held) == 0:
        raise InputError(f"{store.path} has no val or test rows: extract with a split that holds examples out")
    pick = np.sort(np.random.default_rng(seed).choice(held, min(n_examples, len(held)), replace=False))
    return [examples[i] for i in pick if i < len(examples)]


# --- the side effect ---------------------------------------------------------------------------------------------
def corpus_sequences(tokenizer, n_tokens: int = 1024, max_len: int = 128) -> list[list[int]]:
    """Token ids of the corpus task's test documents (held out by source, as an extraction splits them), each cut
    to ``max_len`` tokens, until ``n_tokens`` tokens are taken."""
    task = TASKS["corpus"]
    docs = task.examples(0)
    test = assign_splits([d.group for d in docs], task.split_fractions, 0) == 2
    out, total = [], 0
    for doc in (d for d, t in zip(docs, test) if t):
        if total >= n_tokens:
            break
        ids = example_ids(tokenizer, doc)[:max_len]
        if len(ids) > 1:
            out.append(ids)
            total += len(ids)
    return out


class SideEffects:
    """The clean model's next-token log-probabilities on ``sequences`` (kept in memory: tokens x vocabulary,
    float32), so that :meth:`measure` gives the cross-entropy and KL(clean || current) under current hooks."""

    def __init__(self, model: torch.nn.Module, sequences: list[list[int]], batch_size: int = 4, pad: int = 0):
        if not sequences:
            raise InputError("no corpus text to measure side effects on: pass sequences of at least 2 tokens")
        self.model, self.batches = model, [right_padded(sequences[i:i + batch_size], pad)
                                           for i in range(0, len(sequences), batch_size)]
        self.clean = [lp for lp, _ in self._logprobs()]
        self.n_tokens = sum(len(lp) for lp in self.clean)
        targets = [b["input_ids"][:, 1:][b["attention_mask"][:, 1:].bool()] for b in self.batches]
        nll = sum(float(lp.gather(1, t[:, None]).sum()) for lp, t in zip(self.clean, targets))
        self.ce_clean = -nll / self.n_tokens

    @torch.no_grad()
    def _logprobs(self):
        device = next(self.model.parameters()).device
        for batch in self.batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            keep = mask[:, 1:].bool()
            yield F.log_softmax(logits[keep], -1).cpu(), ids[:, 1:][keep].cpu()  # (T, V), (T,)

    def measure(self) -> tuple[float, float]:
        """(cross-entropy, KL(clean || now)), nats per token, mean over the corpus tokens."""
        ce = kl = 0.0
        for clean, (lp, target) in zip(self.clean, self._logprobs()):
            ce -= float(lp.gather(1, target[:, None]).sum())
            kl += float((clean.exp() * (clean - lp)).sum())
        return ce / self.n_tokens, kl / self.n_tokens


# --- the sweep ---------------------------------------------------------------------------------------------------
@dataclass
class SteerRow:
    """One steered setting: K heads at strength alpha, the probe's heads and directions or a control's draw."""

    k: int
    alpha: float
    condition: str  # one of CONDITIONS
    draw: int  # the control's draw (0 for the probe)
    values: dict[str, float]  # behaviour metric -> mean
    ce: float
    kl: float


@dataclass
class SteerResult:
    """A task's sweep: the clean model's values and one row per (K, alpha, condition, draw)."""

    task: str
    stage: str
    label_names: list[str]
    direction: str
    position: str
    metrics: dict[str, str]  # name -> what it measures
    clean: dict[str, float]
    ce_clean: float
    top_heads: dict[int, list[list[int]]]  # K -> the probe's top K heads
    rows: list[SteerRow] = field(default_factory=list)
    n_examples: int = 0
    n_tokens: int = 0
    draws: int = 0

    @property
    def ks(self) -> list[int]:
        return sorted({r.k for r in self.rows})

    @property
    def alphas(self) -> list[float]:
        return sorted({r.alpha for r in self.rows})

    def summary(self, k: int, alpha: float, metric: str) -> dict:
        """The probe's value and each control's mean and one draw's 95% prediction interval at (k, alpha), as
        changes from the clean model; ``beats`` per control: the probe lies above that interval."""
        at = [r for r in self.rows if r.k == k and r.alpha == alpha]
        probe = [r for r in at if r.condition == "probe"]
        if not probe:
            raise InputError(f"the sweep has no K={k}, alpha={alpha}: pick one of K {self.ks}, alphas {self.alphas}")
        base = self.clean[metric]
        out = {"k": k, "alpha": alpha, "metric": metric, "clean": base, "probe": probe[0].values[metric] - base,
               "ce": probe[0].ce - self.ce_clean, "kl": probe[0].kl}
        for cond in CONDITIONS[1:]:
            v = np.array([r.values[metric] - base for r in at if r.condition == cond])
            pi = t_interval(v, one_draw=True) if len(v) else (float("nan"),) * 2
            out[cond] = {"mean": float(v.mean()) if len(v) else float("nan"), "pi": list(pi),
                         "kl": float(np.mean([r.kl for r in at if r.condition == cond] or [np.nan])),
                         "beats": bool(out["probe"] > pi[1])}
        out["beats_both"] = all(out[c]["beats"] for c in CONDITIONS[1:])
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SteerResult":
        rows = [SteerRow(**r) for r in data["rows"]]
        top = {int(k): v for k, v in data["top_heads"].items()}
        return cls(**{**data, "rows": rows, "top_heads": top})


def _controls(theta: torch.Tensor, sigma: torch.Tensor, top: list, layout, draws: int, rng: np.random.Generator,
              layer_index: dict, head_index: dict) -> dict[str, list[tuple[list, torch.Tensor]]]:
    """Per control, ``draws`` (heads, unit vectors (K, D), sigma (K,)) sets; theta (L', H', D) and sigma (L', H')
    cover the probe's layers and heads (``layer_index``/``head_index`` map model numbers to their slots)."""
    at = lambda heads: ([layer_index[l] for l, _ in heads], [head_index[h] for _, h in heads])  # noqa: E731
    rows, cols = at(top)
    out = {"random_direction": [], "random_heads": []}
    pool = {(l, h) for l in layer_index for h in head_index}  # the heads the probe read
    for _ in range(draws):
        u = torch.from_numpy(rng.normal(size=(len(top), theta.shape[-1]))).float()
        out["random_direction"].append((top, u / u.norm(dim=-1, keepdim=True), sigma[rows, cols]))
        heads = [h for h in draw_random_heads(top, layout.n_layers, layout.n_heads, "all", rng) if h in pool]
        r, c = at(heads)
        out["random_heads"].append((heads, theta[r, c], sigma[r, c]))
    return out


def _measure(loaded, what: Behaviour, side: SideEffects, shift: torch.Tensor | None, position: str) -> tuple:
    if shift is None:
        return what.measure(), side.ce_clean, 0.0
    with HeadSteering(loaded.model, shift, position):
        values = what.measure()
        return values, *side.measure()


def steer_sweep(loaded, probe, store, ks: tuple[int, ...] = (8,), alphas: tuple[float, ...] = ALPHAS,
                direction: str = "mass_mean", position: str = "all", n_examples: int = 64, draws: int = 4,
                corpus_tokens: int = 1024, seed: int = 0, log=print, task=None) -> SteerResult:
    """Sweep K and alpha for one task (see the module docstring): ``probe`` a LinearProbes checkpoint (module or
    reference), ``store`` its training store (open), ``loaded`` the model it was trained on; ``task`` the Task
    (default: the built-in task the probe names)."""
    probe = open_probe(probe)
    cfg = probe.checkpoint_config_loaded
    if loaded.weights_hash != cfg.weights_hash:
        raise InputError(f"{loaded.model_id} (weights {loaded.weights_hash}) is not the model the probe was trained "
                         f"on ({cfg.model_id}, weights {cfg.weights_hash}): pass that model")
    if draws < 2:
        raise InputError(f"--draws {draws}: the controls' prediction interval needs at least 2 draws")
    task = task or TASKS.get(cfg.task)
    if task is None:
        raise InputError(f"the probe's task {cfg.task!r} is not a built-in task: steering measures built-in tasks")
    build_intervention(probe, store, k=max(ks), direction=direction, position=position)  # checks inputs up front
    n_heads = len(cfg.layers) * (cfg.n_heads if cfg.heads is None else len(cfg.heads))
    if 2 * max(ks) > n_heads:
        raise InputError(f"--k {max(ks)}: the random-heads control draws K heads besides the top K, and the probe "
                         f"read {n_heads}: steer at most {n_heads // 2} heads")
    examples = held_out_examples(task, store, n_examples, seed)
    what = behaviour(loaded, task, examples)
    side = SideEffects(loaded.model, corpus_sequences(loaded.tokenizer, corpus_tokens),
                       pad=getattr(loaded.tokenizer, "pad_token_id", None) or 0)
    clean, ce_clean, _ = _measure(loaded, what, side, None, position)
    head_ids = list(range(cfg.n_heads)) if cfg.heads is None else list(cfg.heads)
    theta = probe_directions(probe, direction)
    sigma = projection_std(store, theta, cfg.layers, head_ids)
    ranking = head_ranking(probe.checkpoint_metrics_loaded, cfg.layers, head_ids)
    result = SteerResult(cfg.task, cfg.stage, list(cfg.label_names), direction, position, what.names, clean, ce_clean,
                         {k: [list(h) for h in ranking[:k]] for k in ks}, n_examples=what.n_examples,
                         n_tokens=side.n_tokens, draws=draws)
    layout = head_layout(loaded.model)
    layer_index, head_index = {l: i for i, l in enumerate(cfg.layers)}, {h: i for i, h in enumerate(head_ids)}
    for k in ks:
        top = ranking[:k]
        r, c = [layer_index[l] for l, _ in top], [head_index[h] for _, h in top]
        sets = {"probe": [(top, theta[r, c], sigma[r, c])],
                **_controls(theta, sigma, top, layout, draws, np.random.default_rng([seed, k]), layer_index,
                            head_index)}
        for alpha in alphas:
            result.rows += _sweep_point(loaded, what, side, sets, layout, k, alpha, clean, ce_clean, position)
            at = result.summary(k, alpha, "margin")
            log(f"steer: {cfg.task} K={k} alpha={alpha:g}: margin {at['probe']:+.3f} (random directions "
                f"{at['random_direction']['mean']:+.3f}, random heads {at['random_heads']['mean']:+.3f}), "
                f"CE {at['ce']:+.3f}, KL {at['kl']:.3f}")
    return result


def _sweep_point(loaded, what, side, sets: dict, layout, k: int, alpha: float, clean: dict, ce_clean: float,
                 position: str) -> list[SteerRow]:
    """Every condition's draws at one (K, alpha); alpha 0 is the clean model for all of them."""
    rows = []
    for cond, draws in sets.items():
        for i, (heads, vectors, sigma) in enumerate(draws):
            if alpha == 0:
                values, ce, kl = clean, ce_clean, 0.0
            else:
                shift = shift_table(layout.n_layers, layout.n_heads, heads, alpha * sigma[:, None] * vectors)
                values, ce, kl = _measure(loaded, what, side, shift, position)
            rows.append(SteerRow(k, float(alpha), cond, i, dict(values), float(ce), float(kl)))
    return rows
