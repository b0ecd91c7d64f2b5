"""Reuse the clean forward's prefix in ablated forwards: layers before the first ablated one see exactly the inputs
they saw in the clean run, so their outputs can be replayed instead of recomputed.

The ablation check runs a task's metric on the clean model, then again with each head set ablated (the top heads and
20 random draws), on the same inputs in the same order. :class:`PrefixReplay` records every decoder block's output
during the clean run (one entry per forward call) and, for an ablated run whose first ablated layer is ``l``,
swaps the forward of blocks ``0..l-1`` for one that returns the recorded output of the same call. The result is the
same as recomputing (the replayed blocks are unchanged by an ablation further up, and run on the same inputs); the
cost of those blocks goes away. It needs the ablated run to make the same forward calls as the recorded one, which
the metric functions do (same examples, same batches); a call beyond the recording, or of another batch shape, is
refused rather than replayed wrongly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from headprobe.extract.hooks import spec_for


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks (one per layer), in order."""
    return list(model.base_model.get_submodule(spec_for(model).layers))


class PrefixReplay:
    """Records the blocks' outputs of one run of forward calls, and replays those of the first layers in later
    runs of the same calls (see the module docstring). ``max_bytes`` bounds the recording: a run that would exceed
    it records nothing (later runs then recompute everything)."""

    def __init__(self, model: nn.Module, max_bytes: int = 2 << 30):
        self.blocks = decoder_blocks(model)
        self.outputs: list[list[object]] = []  # [call][layer] -> the block's output
        self.shapes: list[tuple] = []  # [call] -> the first block's input shape
        self.max_bytes, self.complete = max_bytes, False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record every block's output of the forward calls made inside."""
        self.outputs, self.shapes, self.complete = [], [], False
        size = [0]

        def starts(module, args, kwargs):
            self.outputs.append([None] * len(self.blocks))
            self.shapes.append(tuple(_hidden(args, kwargs).shape))

        def keeps(i: int):
            def hook(module, args, kwargs, output):
                size[0] += _nbytes(output)
                self.outputs[-1][i] = _detached(output)
            return hook

        handles = [self.blocks[0].register_forward_pre_hook(starts, with_kwargs=True)]
        handles += [b.register_forward_hook(keeps(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()
        self.complete = size[0] <= self.max_bytes and all(o is not None for call in self.outputs for o in call)
        if not self.complete:
            self.outputs, self.shapes = [], []

    @contextmanager
    def replay(self, first_layer: int) -> Iterator[None]:
        """Inside, blocks ``0..first_layer-1`` return their recorded outputs, call by call."""
        if not self.complete or first_layer <= 0:
            yield
            return
        call = [-1]

        def starts(module, args, kwargs):
            call[0] += 1
            if call[0] >= len(self.outputs) or tuple(_hidden(args, kwargs).shape) != self.shapes[call[0]]:
                raise RuntimeError("an ablated run made other forward calls than the recorded clean run: the "
                                   "metric must run the same batches every time")

        def replayed(i: int):
            return lambda *args, **kwargs: self.outputs[call[0]][i]

        saved = [b.forward for b in self.blocks[:first_layer]]
        handle = self.blocks[0].register_forward_pre_hook(starts, with_kwargs=True)
        for i, block in enumerate(self.blocks[:first_layer]):
            block.forward = replayed(i)
        try:
            yield
        finally:
            handle.remove()
            for block, forward in zip(self.blocks, saved):
                block.forward = forward


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden-state input (its first positional argument, or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


def _nbytes(output) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, tuple):
        return sum(_nbytes(o) for o in output)
    return 0
