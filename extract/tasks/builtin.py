"""Built-in tasks, two or more per reasoning stage. Each is generated offline and deterministically from a seed.

True/false tasks come in pairs (one true and one false statement sharing a prefix); both carry the same ``choice``,
which asks the model itself to prefer the true completion (``extract/tasks/metrics.py``).
"""
from __future__ import annotations

import csv
import random

from headprobe.extract.shipped import shipped_folder
from headprobe.extract.tasks.base import Example, Task
from headprobe.extract.tasks.corpus import make_corpus

DATA = shipped_folder("datasets")
TRUE_FALSE = ["false", "true"]


def _read_csv(rel: str) -> list[dict]:
    with open(DATA / rel, newline="") as f:
        return list(csv.DictReader(f))


def _pair(prompt: str, true: str, false: str, group: str, sep: str = " ") -> list[Example]:
    """A true and a false statement ``prompt + sep + completion``; the model is asked to prefer the true one."""
    choice = {"prompt": prompt, "candidates": [sep + true, sep + false], "answer": 0}
    return [Example(text=prompt + sep + true, label=1, group=group, choice=choice),
            Example(text=prompt + sep + false, label=0, group=group, choice=choice)]


def _other(rng: random.Random, values: list[str], not_this: str) -> str:
    return rng.choice([v for v in values if v != not_this])


# --- KR: knowledge recalling -------------------------------------------------------------------------------------

def _capitals(seed: int) -> list[Example]:
    """Per country, 'The capital of X is' its capital (true) or another country's capital (false)."""
    rows = _read_csv("facts/capitals.csv")
    rng, capitals = random.Random(seed), [r["capital"] for r in rows]
    return [ex for r in rows for ex in _pair(f"The capital of {r['country']} is", r["capital"],
                                             _other(rng, capitals, r["capital"]), r["country"])]


def _city_country(seed: int) -> list[Example]:
    """Per (non-capital) city, 'X is a city in' its country (true) or another country (false)."""
    rows = _read_csv("facts/cities.csv")
    rng, countries = random.Random(seed), sorted({r["country"] for r in rows})
    return [ex for r in rows for ex in _pair(f"{r['city']} is a city in", r["country"],
                                             _other(rng, countries, r["country"]), r["city"])]


# --- ICI: in-context identification ------------------------------------------------------------------------------

NAMES = ("Mary John Alice Bob Sarah James Emma David Anna Michael Laura Daniel Kate Peter Lisa Tom Rachel Mark Julia "
         "Paul Susan Chris Helen Steve Amy Ryan Emily Jack Grace Adam Sophie Ben Lucy Sam Claire Mike").split()
PLACES = ["store", "park", "school", "office", "station", "hospital", "garden", "market", "library", "restaurant"]
OBJECTS = ["drink", "book", "ring", "letter", "bag", "key", "ball", "pen", "gift", "basket"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long argument at the {place}. Afterwards {S} said to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
]


def _ioi(seed: int, n: int = 300) -> list[Example]:
    """Indirect-object identification (Wang et al. 2022). Label: is the indirect object the first or the second
    name of the sentence (ABBA vs BABA); the model should continue with the IO, not the repeated subject S."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        io_second = rng.random() < 0.5
        io, s = (b, a) if io_second else (a, b)
        text = rng.choice(IOI_TEMPLATES).format(A=a, B=b, S=s, place=rng.choice(PLACES), object=rng.choice(OBJECTS))
        out.append(Example(text=text, label=int(io_second), group="|".join(sorted((a, b))),
                           choice={"prompt": text, "candidates": [" " + io, " " + s], "answer": 0}))
    return out


COPY_CATEGORIES = ["animal", "food"]


def _category_words() -> dict[str, int]:
    """word -> category index (``COPY_CATEGORIES``) of ``datasets/words/categories.csv``."""
    return {r["word"]: COPY_CATEGORIES.index(r["category"]) for r in _read_csv("words/categories.csv")}


def _repeats(seed: int, n: int = 200) -> list[Example]:
    """Random sequences of 12-20 distinct animal and food words, then the same words again. Labels come from the
    token ids (``next_word_category``): only the copy is labelled, by the category of the next word."""
    rng, words, out = random.Random(seed), sorted(_category_words()), []
    for i in range(n):
        first = rng.sample(words, rng.randint(12, 20))
        out.append(Example(text=" ".join(first + first), group=f"seq{i}"))
    return out


def next_word_category(ids: list[int], tokenizer) -> list[int | None]:
    """Per token: the category of the next word where the (this word, next word) pair occurred earlier in the
    context, read at this word's last token; None (no row) elsewhere.

    In a random word sequence neither this word nor the ones before it tell the next word's category; only the
    earlier occurrence of this word, followed by the next one, does: the label is what an induction head copies.
    Words are found in ``ids`` by their own tokenization " word" (longest match first), for any tokenizer.
    """
    category = _category_words()
    encoded = tokenizer([" " + w for w in category], add_special_tokens=False)["input_ids"]
    lexicon = {tuple(ids_w): c for ids_w, c in zip(encoded, category.values())}
    sizes = sorted({len(k) for k in lexicon}, reverse=True)
    found, p = [], 0  # (last token index, word ids, category) of every word in the sequence
    while p < len(ids):
        key = next((tuple(ids[p:p + k]) for k in sizes if tuple(ids[p:p + k]) in lexicon), None)
        if key is None:
            p += 1
            continue
        found.append((p + len(key) - 1, key, lexicon[key]))
        p += len(key)
    labels: list[int | None] = [None] * len(ids)
    pairs = set()
    for (end, key, _), (_, nxt, next_category) in zip(found, found[1:]):
        if (key, nxt) in pairs:
            labels[end] = next_category
        pairs.add((key, nxt))
    return labels


# --- LR: latent reasoning ----------------------------------------------------------------------------------------

ARITHMETIC_SHOTS = "12 + 7 = 19\n31 + 25 = 56\n"  # two worked sums: without them the model is near chance


def _arithmetic(seed: int, n: int = 200) -> list[Example]:
    """'a + b = c' after two worked sums, with the true sum or a sum off by 1, 2 or 10; one pair per unordered
    (a, b)."""
    rng, seen, out = random.Random(seed), {(7, 12), (25, 31)}, []
    while len(seen) < n + 2:
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        out += _pair(f"{ARITHMETIC_SHOTS}{a} + {b} =", str(a + b), str(wrong), f"{key[0]}+{key[1]}")
    return out


DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
SEQUENCES = {
    "day": (DAYS, True),
    "month": (MONTHS, True),
    "letter": ([chr(c) for c in range(ord("A"), ord("Z") + 1)], False),
    "number": ([str(k) for k in range(1, 61)], False),
}


def _successor(seed: int) -> list[Example]:
    """'The day/month/letter/number after X is' its successor (true) or another item of the sequence (false)."""
    rng, out = random.Random(seed), []
    for kind, (items, cyclic) in SEQUENCES.items():
        for k in range(len(items) if cyclic else len(items) - 1):
            nxt = items[(k + 1) % len(items)]
            wrong = rng.choice([v for v in items if v not in (nxt, items[k])])
            out += _pair(f"The {kind} after {items[k]} is", nxt, wrong, f"{kind}:{items[k]}")
    return out


EVENTS = ["war", "expedition", "reign", "drought", "construction", "famine", "journey", "conflict", "project", "siege"]


def _greater_than(seed: int, n: int = 240) -> list[Example]:
    """Greater-than (Hanna et al. 2023): 'The war lasted from the year 1732 to the year 17' + a later (true) or an
    earlier (false) two-digit year; grouped by start year so no start year is in two splits."""
    rng, out = random.Random(seed), []
    for i in range(n):
        century, start = rng.randint(11, 19), rng.randint(11, 88)
        later, earlier = rng.randint(start + 1, 99), rng.randint(1, start - 1)
        prompt = f"The {rng.choice(EVENTS)} lasted from the year {century}{start:02d} to the year {century}"
        out += _pair(prompt, f"{later:02d}", f"{earlier:02d}", f"start{start:02d}", sep="")
    return out


# --- EP: expression preparation ----------------------------------------------------------------------------------

def _facts(seed: int) -> list[Example]:
    """Common-knowledge statements with their true or a false completion (TruthfulQA-style, but simple)."""
    return [ex for r in _read_csv("facts/common_knowledge.csv") for ex in _pair(r["prompt"], r["true"], r["false"],
                                                                                 r["prompt"])]


POSITIVE = ["wonderful", "excellent", "amazing", "fantastic", "brilliant", "delightful", "superb", "great", "lovely",
            "charming", "beautiful", "enjoyable", "outstanding", "perfect", "pleasant", "terrific"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "bad", "dull", "annoying",
            "painful", "mediocre", "ugly", "unpleasant", "weak", "lousy"]
THINGS = ["movie", "book", "restaurant", "hotel", "album", "play", "game", "show"]
VERBS = {1: ["loved", "enjoyed", "adored", "liked"], 0: ["hated", "disliked", "regretted", "despised"]}


def _sentiment(seed: int, n: int = 300) -> list[Example]:
    """Templated reviews (ToyMovieReview-style); label: positive or negative. Grouped by the main adjective, so no
    test review's main adjective is a training review's main adjective (it may still be a training review's second
    adjective, and the verb alone tells the label)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        label = rng.randint(0, 1)
        adjs = POSITIVE if label else NEGATIVE
        adj, adj2 = rng.sample(adjs, 2)
        review = (f"I thought this {rng.choice(THINGS)} was {adj}. I {rng.choice(VERBS[label])} it, and the ending "
                  f"was {adj2}.")
        text = f"Review: {review}\nSentiment:"
        out.append(Example(text=text, label=label, group=adj,
                           choice={"prompt": text, "candidates": [" positive", " negative"], "answer": 1 - label}))
    return out


TASKS = [
    Task("capitals", "KR", "true/false 'The capital of X is Y'", TRUE_FALSE, _capitals, card="cards/capitals.md"),
    Task("city_country", "KR", "true/false 'X is a city in Y'", TRUE_FALSE, _city_country,
         card="cards/city_country.md"),
    Task("ioi", "ICI", "indirect object: is the IO the first or the second name (read at the last token)",
         ["io_first", "io_second"], _ioi, card="cards/ioi.md"),
    Task("repeat_tokens", "ICI", "random animal/food words, then again; per copied word: the next word's category",
         COPY_CATEGORIES, _repeats, position_rule="all", card="cards/repeat_tokens.md",
         token_labeler=next_word_category, metric="induction"),
    Task("arithmetic", "LR", "true/false 'a + b = c' (a, b < 50; two worked sums first)", TRUE_FALSE, _arithmetic,
         card="cards/arithmetic.md"),
    Task("successor", "LR", "true/false 'The day/month/letter/number after X is Y'", TRUE_FALSE, _successor,
         card="cards/successor.md"),
    Task("greater_than", "LR", "true/false 'lasted from the year 1732 to the year 17YY' (end after start)",
         TRUE_FALSE, _greater_than, card="cards/greater_than.md"),
    Task("facts", "EP", "true/false completions of common-knowledge statements", TRUE_FALSE, _facts,
         card="cards/facts.md"),
    Task("sentiment", "EP", "templated reviews: positive or negative (read at 'Sentiment:')", ["negative", "positive"],
         _sentiment, card="cards/sentiment.md"),
    Task("corpus", "", "unlabelled English prose (Python manual and stdlib docstrings) for SAE training", [],
         make_corpus, position_rule="all", label_kind="none", card="cards/corpus.md", metric="none"),
]
