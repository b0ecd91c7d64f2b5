"""Binary (Yes/No) questions for the negative attention score (Yu et al. 2024, arXiv 2408.00137), built offline
from the shipped facts (``datasets/facts/capitals.csv`` and ``cities.csv``; card ``datasets/cards/yes_no.md``).

Each prompt's instruction names both answer candidates, as the paper's binary-decision prompts do:

    HEAD "Answer the following question with" " Yes" " or" " No" "." QUESTION TAIL

with QUESTION "\\nQuestion: Is Paris the capital of France?" (or "Is Lyon a city in France?"), true or false (another
capital, another country). Every question comes in both candidate orders ("Yes or No", "No or Yes"), so a head
that prefers a position rather than the negative word averages out. With a chat template (an instruct model) HEAD and
TAIL are its text around the user's message and the reply's first token is the answer ("Yes"/"No"); without one
HEAD is the tokenizer's BOS (if it adds one) and TAIL is "\\nAnswer:" (answer " Yes"/" No"). Pieces are tokenized one
by one, so ``yes`` and ``no`` are the exact token spans of the candidates in the instruction and ``query_start``
the first position after it. The same questions with an unrelated pair of words as the candidates
(``PLACEBO_WORDS``: " Red"/" Blue", ...) are the placebo prompts of the negative score's null.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass

from headprobe import InputError
from headprobe.extract.shipped import shipped_folder

INSTRUCTION = "Answer the following question with"
WORDS = (" Yes", " No")
PLACEBO_WORDS = ((" Red", " Blue"), (" Up", " Down"), (" Left", " Right"), (" Hot", " Cold"), (" Day", " Night"),
                 (" Old", " New"))  # unrelated pairs: how much heads prefer one word of a pair for no reason
MARK = "\x00"


@dataclass
class BinaryQuestion:
    ids: list[int]
    yes: tuple[int, int]  # [start, end) of the positive candidate in the instruction (" Yes", or a placebo's first)
    no: tuple[int, int]  # [start, end) of the negative candidate (" No", or a placebo's second)
    query_start: int  # first position after the instruction
    truth: int  # 1: the right answer is Yes
    answer_ids: tuple[int, int]  # the first token where the replies "Yes" and "No" differ
    text: str


def _facts() -> list[tuple[str, str, str]]:
    """(entity, relation, object) facts: capitals and cities, in file order."""
    folder = shipped_folder("datasets") / "facts"
    with open(folder / "capitals.csv", newline="") as f:
        out = [(r["capital"], "the capital of", r["country"]) for r in csv.DictReader(f)]
    with open(folder / "cities.csv", newline="") as f:
        out += [(r["city"], "a city in", r["country"]) for r in csv.DictReader(f)]
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_difference(a: list[int], b: list[int]) -> tuple[int, int]:
    """The first tokens where two encodings differ (a byte-level tokenizer starts " Yes" and " No" alike)."""
    return next(((x, y) for x, y in zip(a, b) if x != y), (a[0], b[0]))


def _frame(tokenizer, chat: bool | None) -> tuple[list[int], list[int], str]:
    """(head tokens, tail tokens, the answer's prefix: "" after a chat template's reply start, else " ")."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat and not template:
        raise InputError("the tokenizer has no chat template: build the binary questions with chat=False")
    if not chat:
        return list(tokenizer("", add_special_tokens=True)["input_ids"]), _encode(tokenizer, "\nAnswer:"), " "
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(MARK)
    return _encode(tokenizer, head), _encode(tokenizer, tail), ""


def binary_question(tokenizer, question: str, truth: int, yes_first: bool, chat: bool | None = None,
                    words: tuple[str, str] = WORDS) -> BinaryQuestion:
    """One prompt: the instruction naming the candidates ``words`` (positive, negative) in the given order, then
    ``question``."""
    head, tail, lead = _frame(tokenizer, chat)
    first, second = words if yes_first else words[::-1]
    pieces = [head, _encode(tokenizer, INSTRUCTION), _encode(tokenizer, first), _encode(tokenizer, " or"),
              _encode(tokenizer, second), _encode(tokenizer, ".")]
    starts = [sum(map(len, pieces[:i])) for i in range(len(pieces) + 1)]
    spans = [(starts[2], starts[3]), (starts[4], starts[5])]
    yes, no = spans if yes_first else spans[::-1]
    ids = sum(pieces, []) + _encode(tokenizer, f"\nQuestion: {question}") + tail
    answers = _first_difference(*(_encode(tokenizer, lead + w.strip()) for w in words))
    order = f"{first.strip()} or {second.strip()}"
    return BinaryQuestion(ids, yes, no, starts[-1], truth, answers, f"{INSTRUCTION} {order}. {question}")


def binary_questions(tokenizer, n: int = 128, seed: int = 0, chat: bool | None = None,
                     words: tuple[str, str] = WORDS) -> list[BinaryQuestion]:
    """``n`` prompts (rounded up to a multiple of 4): facts drawn by ``seed``, each asked true and false, each in
    both candidate orders. Other ``words`` than (" Yes", " No") make the placebo prompts of the negative score's
    null (the same questions with an unrelated pair of candidates)."""
    facts = _facts()
    if not 1 <= n <= 4 * len(facts):
        raise InputError(f"--questions {n}: pass 1 to {4 * len(facts)}")
    rng = random.Random(seed)
    out = []
    for entity, relation, obj in rng.sample(facts, (n + 3) // 4):
        wrong = rng.choice([f[0] for f in facts if f[1] == relation and f[2] != obj])
        for truth, who in ((1, entity), (0, wrong)):
            for yes_first in (True, False):
                out.append(binary_question(tokenizer, f"Is {who} {relation} {obj}?", truth, yes_first, chat, words))
    return out
