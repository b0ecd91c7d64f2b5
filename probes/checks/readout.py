"""A task metric for labels the model is never asked about: how clearly its last layer says the label.

The true/false statement tasks label a finished statement, and their probes read its last token; the model's own
metric scores the prediction of the answer one token earlier, and the model cannot be asked to judge the statement
(``bench/bench_judgement.py``). The readout asks instead whether the label is still written where the model's
output is made: a logistic probe on the final hidden state (after the last norm, what the LM head reads) at the
read token, fit on the clean model. Under an ablation, the metric of an example is that fixed probe's
log-probability of the example's label; heads that carry the label to the last layer lower it when ablated. It is
a metric of the model's representation, not of its behaviour (related to the "amnesic probing" of Elazar et al.
2021, which removes a property and watches behaviour; this removes heads and watches a probe).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from headprobe import InputError
from headprobe.extract.tasks.base import Example
from headprobe.extract.tasks.metrics import example_ids, right_padded

READOUT = "readout_logprob"  # the metric's name in ablation.json and the report


@torch.no_grad()
def last_hidden(model: nn.Module, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """Final hidden state (after the last norm) of each sequence's last token: (N, d_model), float64."""
    base = model.base_model  # the decoder without its LM head
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        hidden = base(**right_padded(chunk, device=device), use_cache=False).last_hidden_state  # (B, S, d_model)
        last = torch.tensor([len(x) - 1 for x in chunk], device=hidden.device)  # right padding: its own last token
        out.append(hidden[torch.arange(len(chunk), device=hidden.device), last].double().cpu().numpy())
    return np.concatenate(out)


def readout_metric(model: nn.Module, tokenizer: object, examples: list[Example], scored: list[Example], folds: int = 4,
                   Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)) -> Callable[[nn.Module], np.ndarray]:
    """Fit readouts on the clean model and return ``metric(model)``: each ``scored`` example's log-probability of
    its label under a readout fit without its group, (len(scored),).

    Cross-fit: the scored examples are split into ``folds`` by group, and each fold's readout is fit on every
    example of ``examples`` outside that fold's groups (last token of each; the inverse L2 strength chosen from
    ``Cs`` by log loss over 5 stratified group folds), so that all but a fold's worth of the task's examples train
    each one.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for name, exs in (("", examples), ("scored ", scored)):
        if not exs or any((ex.text is None and ex.token_ids is None) or ex.label is None for ex in exs):
            raise InputError(f"the readout's {name}examples need texts (or token ids) and labels: pass labelled "
                             "examples")
    y, y_scored = (np.array([int(ex.label) for ex in exs]) for exs in (examples, scored))
    if len(np.unique(y)) < 2:
        raise InputError("the readout's examples hold one label only: pass examples of every label")
    if not np.isin(y_scored, y).all():
        missing = sorted(set(y_scored.tolist()) - set(y.tolist()))
        raise InputError(f"scored labels {missing} are in none of the readout's examples: pass examples of every label")
    groups, scored_groups = np.array([ex.group for ex in examples]), np.array([ex.group for ex in scored])
    n_folds = min(folds, len(set(scored_groups)))
    if n_folds < 2:
        raise InputError("the scored examples come from one group: pass examples of at least 2 groups")
    splits = [(rows, ~np.isin(groups, scored_groups[rows]))  # (rows of scored, the examples to fit their readout on)
              for _, rows in GroupKFold(n_folds).split(y_scored, groups=scored_groups)]
    for rows, keep in splits:
        if not np.isin(y_scored[rows], y[keep]).all() or len(np.unique(y[keep])) < 2:
            raise InputError("a readout fold lacks a label of its scored examples: pass more examples of every label")
    hidden = last_hidden(model, [example_ids(tokenizer, ex) for ex in examples])
    ids_scored = [example_ids(tokenizer, ex) for ex in scored]
    parts = []  # (rows of scored, the readout fit without their groups, the label's column in it)
    for rows, keep in splits:
        readout = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                               {"logisticregression__C": list(Cs)}, cv=StratifiedGroupKFold(5), scoring="neg_log_loss")
        readout.fit(hidden[keep], y[keep], groups=groups[keep])
        parts.append((rows, readout, np.searchsorted(readout.classes_, y_scored[rows])))

    def metric(m: nn.Module) -> np.ndarray:
        hidden_scored = last_hidden(m, ids_scored)  # (len(scored), d_model)
        out = np.empty(len(scored))
        for rows, readout, column in parts:
            out[rows] = readout.predict_log_proba(hidden_scored[rows])[np.arange(len(rows)), column]
        return out
    return metric
