"""Modeling-free checks of what the probes find: ablating heads (:mod:`.ablation`), attention-pattern scores of
head types (:mod:`.head_scores`) and a last-layer readout metric for tasks the model is never asked to judge
(:mod:`.readout`). They act on a Hugging Face model through hooks at the heads' output projections."""
