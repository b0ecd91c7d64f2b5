"""A task metric for labels the model is never asked about: how clearly its last layer says the label.

The true/false statement tasks label a finished statement, and their probes read its last token; the model's own
metric scores the prediction of the answer one token earlier, and the model cannot be asked to judge the statement
(``bench/bench_judgement.py``). The readout asks instead whether the label is still written where the model's
output is made: a logistic probe on the final hidden state (after the last norm, what the LM head reads) at the
read token, fit once on the clean model. Under an ablation, the metric of an example is that fixed probe's
log-probability of the example's label; heads that carry the label to the last layer lower it when ablated. It is
a metric of the model's representation, not of its behaviour (the "amnesic probing" idea of Elazar et al. 2021).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from extract.tasks.base import Example


@torch.no_grad()
def last_hidden(model: nn.Module, ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """Final hidden state (after the last norm) of each sequence's last token: (N, d_model), float64."""
    base = model.base_model  # the decoder without its LM head
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        width = max(map(len, chunk))
        device = next(model.parameters()).device
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in chunk], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
        hidden = base(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, S, d_model)
        last = torch.tensor([len(x) - 1 for x in chunk], device=device)
        out.append(hidden[torch.arange(len(chunk), device=device), last].double().cpu().numpy())
    return np.concatenate(out)


def readout_metric(model: nn.Module, tokenizer, examples: list[Example], score: list[Example], folds: int = 4,
                   Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)) -> Callable[[nn.Module], np.ndarray]:
    """Fit readouts on the clean model and return ``metric(model)``: each ``score`` example's log-probability of
    its label under a readout fit without its group, (len(score),).

    Cross-fit: the score examples are split into ``folds`` by group, and each fold's readout is fit on every
    example of ``examples`` outside that fold's groups (last token of each text; the inverse L2 strength chosen
    from ``Cs`` by 5-fold log loss), so that all but a fold's worth of the task's examples train each readout.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for name, exs in (("", examples), ("score ", score)):
        if not exs or any(ex.text is None or ex.label is None for ex in exs):
            raise ValueError(f"the readout's {name}examples need texts and labels: pass labelled text examples")
    y, y_score = (np.array([int(ex.label) for ex in exs]) for exs in (examples, score))
    if len(np.unique(y)) < 2:
        raise ValueError("the readout's examples hold one label only: pass examples of every label")
    groups, score_groups = np.array([ex.group for ex in examples]), np.array([ex.group for ex in score])
    n_folds = min(folds, len(set(score_groups)))
    if n_folds < 2:
        raise ValueError("the score examples come from one group: pass examples of at least 2 groups")
    hidden = last_hidden(model, [tokenizer(ex.text)["input_ids"] for ex in examples])
    ids_score = [tokenizer(ex.text)["input_ids"] for ex in score]
    parts = []  # (rows of score, the readout fit without their groups, the label's column in it)
    for _, rows in GroupKFold(n_folds).split(ids_score, groups=score_groups):
        keep = ~np.isin(groups, score_groups[rows])
        if len(np.unique(y[keep])) < 2 or not np.isin(y_score[rows], y[keep]).all():
            raise ValueError("a readout fold lacks a label of its score examples: pass more examples of every label")
        readout = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                               {"logisticregression__C": list(Cs)}, cv=5, scoring="neg_log_loss")
        readout.fit(hidden[keep], y[keep])
        parts.append((rows, readout, np.searchsorted(readout.classes_, y_score[rows])))

    def metric(m: nn.Module) -> np.ndarray:
        hidden_score = last_hidden(m, ids_score)  # (len(score), d_model)
        out = np.empty(len(score))
        for rows, readout, column in parts:
            out[rows] = readout.predict_log_proba(hidden_score[rows])[np.arange(len(rows)), column]
        return out
    return metric
