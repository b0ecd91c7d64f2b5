"""Needle-in-a-haystack prompts for the retrieval score (Wu et al. 2024, arXiv 2404.15574), built offline.

The haystack is the shipped corpus (``extract/tasks/corpus.py``: prose from the Python manual and the standard
library's docstrings, shuffled by document with a seed per needle). A needle is a made-up statement whose answer the
model cannot know (``datasets/needles/needles.csv``: statement, answer, end, question; card
``datasets/cards/needles.md``). Each prompt is exactly ``length`` tokens:

    HEAD haystack[:cut] "\\n\\n" statement " " answer end "\\n\\n" haystack[cut:] QUESTION TAIL statement

and the model should go on with " " answer. With a chat template (an instruct model) HEAD and TAIL are the
template's text around the user's message, QUESTION is "\\n\\nQuestion: <question>", and the assistant's reply
starts with the needle's statement; without one HEAD is the tokenizer's BOS (if it adds one), QUESTION is
"\\n\\nBased on the text above, answer the question.\\nQuestion: <question>\\nAnswer:" and the statement follows
after a space. Restating the question is what the models of Wu et al. do before they copy the answer; a 135M model
does it less reliably (measured on SmolLM2-135M-Instruct: with the reply left to the model 9 of 12 prompts got the
answer, with the statement given 11 of 12). The needle goes in at the document boundary nearest ``depth`` x the
haystack's tokens (0: first, 1: last). Pieces are tokenized one by one and concatenated, so the answer's tokens in
the needle are exactly the tokens the model should emit (the retrieval score compares token ids), and ``span`` says
where they are.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field

from headprobe import InputError
from headprobe.extract.shipped import shipped_folder
from headprobe.extract.tasks.corpus import documents

NEEDLES_CSV = "needles/needles.csv"
PLAIN_QUESTION = "\n\nBased on the text above, answer the question.\nQuestion: {question}\nAnswer: "
CHAT_QUESTION = "\n\nQuestion: {question}"
MARK = "\x00"  # stands for the user's message while the chat template is split around it
LENGTHS = (256, 512, 1024)
DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class Needle:
    statement: str
    answer: str
    end: str
    question: str


@dataclass
class NeedlePrompt:
    """One prompt of exactly ``length`` tokens; the answer's tokens lie at ``ids[span[0]:span[1]]``."""

    ids: list[int]
    answer: list[int]
    span: tuple[int, int]
    length: int
    depth: float
    needle: int  # index into needles()
    meta: dict = field(default_factory=dict)


def needles() -> list[Needle]:
    """The shipped needles, in file order."""
    with open(shipped_folder("datasets") / NEEDLES_CSV, newline="") as f:
        return [Needle(r["statement"], r["answer"], r["end"], r["question"]) for r in csv.DictReader(f)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _haystack(tokenizer, n_tokens: int, seed: int) -> tuple[list[int], list[int]]:
    """At least ``n_tokens`` tokens of corpus documents shuffled by ``seed`` (each after "\\n\\n" but the first),
    cut to ``n_tokens``, and the document boundaries (token offsets, 0 and the end included)."""
    docs = [text for _, text in documents(400)]
    random.Random(seed).shuffle(docs)
    ids, bounds = [], [0]
    for i, text in enumerate(docs):
        if len(ids) >= n_tokens:
            break
        ids += _encode(tokenizer, ("\n\n" if i else "") + text)
        bounds.append(len(ids))
    return ids[:n_tokens], sorted({b for b in bounds if b < n_tokens} | {n_tokens})


def prompt_frame(tokenizer, needle: Needle, chat: bool | None = None) -> tuple[list[int], list[int]]:
    """The tokens before the haystack and those after it (question, end of the user's turn, the statement the
    reply starts with); ``chat`` None: use the tokenizer's chat template where it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat and not template:
        raise InputError("the tokenizer has no chat template: build the needle prompts with chat=False")
    if not chat:
        bos = list(tokenizer("", add_special_tokens=True)["input_ids"])
        return bos, _encode(tokenizer, PLAIN_QUESTION.format(question=needle.question) + needle.statement)
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(MARK)
    question = CHAT_QUESTION.format(question=needle.question)
    return _encode(tokenizer, head), _encode(tokenizer, question) + _encode(tokenizer, tail + needle.statement)


def _parts(tokenizer, needle: Needle, chat: bool | None) -> tuple[list[int], ...]:
    """The prompt's fixed pieces: frame head, the needle's lead-in, its answer, its end, and the question's tail."""
    head, tail = prompt_frame(tokenizer, needle, chat)
    return (head, _encode(tokenizer, "\n\n" + needle.statement), _encode(tokenizer, " " + needle.answer),
            _encode(tokenizer, needle.end + "\n\n"), tail)


def shortest_length(tokenizer, n_needles: int = 4, chat: bool | None = None) -> int:
    """The fewest tokens a needle prompt of the first ``n_needles`` needles can have (one haystack token)."""
    return max(sum(map(len, _parts(tokenizer, n, chat))) + 1 for n in needles()[:n_needles])


def needle_prompt(tokenizer, needle: Needle, length: int, depth: float, seed: int = 0, index: int = 0,
                  chat: bool | None = None) -> NeedlePrompt:
    """``needle`` hidden at ``depth`` (0..1) in a haystack (seeded by ``seed`` and ``index``), asked about at the
    end; ``length`` tokens in all (see the module's docstring for ``chat``)."""
    if not 0 <= depth <= 1:
        raise InputError(f"needle depth {depth}: pass depths between 0 and 1")
    head, before, answer, after, tail = _parts(tokenizer, needle, chat)
    budget = length - len(head) - len(before) - len(answer) - len(after) - len(tail)
    if budget < 1:
        raise InputError(f"needle length {length}: too short for the needle and its question "
                         f"({length - budget + 1} tokens at least): pass longer --lengths")
    hay, bounds = _haystack(tokenizer, budget, seed * 1000 + index)
    if len(hay) < budget:
        raise InputError(f"needle length {length}: the corpus holds only {len(hay)} tokens: pass shorter --lengths")
    cut = min(bounds, key=lambda b: abs(b - depth * budget))
    start = len(head) + cut + len(before)
    ids = head + hay[:cut] + before + answer + after + hay[cut:] + tail
    return NeedlePrompt(ids, answer, (start, start + len(answer)), length, depth, index,
                        {"question": needle.question, "answer": needle.answer, "cut": cut})


def needle_prompts(tokenizer, lengths=LENGTHS, depths=DEPTHS, n_needles: int = 4, seed: int = 0,
                   chat: bool | None = None) -> list[NeedlePrompt]:
    """The first ``n_needles`` needles, each at every length and depth: len(lengths) x len(depths) x n_needles
    prompts, ordered by length (prompts of one length have the same number of tokens and batch without padding)."""
    found = needles()
    if not 1 <= n_needles <= len(found):
        raise InputError(f"--needles {n_needles}: pass 1 to {len(found)} (the needles shipped in "
                         f"datasets/{NEEDLES_CSV})")
    return [needle_prompt(tokenizer, found[i], length, depth, seed, i, chat)
            for length in sorted(lengths) for depth in depths for i in range(n_needles)]
