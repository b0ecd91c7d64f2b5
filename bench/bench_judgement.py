"""Can the model judge the built-in true/false statements when asked?

The ablation check scores true/false tasks by the model's preference for the true completion at the prompt's end,
while their probes read the answer token after it (the report's footnote). A metric at the probe's own position
would need the model to judge the finished statement: this script asks it, appending a question to each statement
and scoring the two answers as a ``choice`` (``extract.tasks.metrics.asked_to_judge``). It prints, per task and
question, the accuracy on true and on false statements and the mean margin of the right answer; a model that
always gives one answer scores 1 on one side and 0 on the other. A model with a chat template is also asked in it.

    python bench/bench_judgement.py                        # the default model, all six true/false tasks (~6 min)
    python bench/bench_judgement.py --tasks capitals,facts --model smollm2-135m
"""
from __future__ import annotations

import argparse
import time

import torch

from headprobe.extract.models import load_model
from headprobe.extract.tasks import Example, get_task
from headprobe.extract.tasks.metrics import asked_to_judge, choice_metric

TRUE_FALSE_TASKS = "capitals,city_country,arithmetic,successor,greater_than,facts"
QUESTIONS = {  # question appended to the statement, (answer if true, answer if false)
    "true-or-false": (". True or false? Answer:", (" True", " False")),
    "is-that-correct": (".\nQuestion: Is that correct? Answer:", (" Yes", " No")),
}
CHAT_QUESTIONS = {  # asked in the model's chat template, as the user; the answer opens the assistant's turn
    "chat: true-or-false": ("Is the following statement true or false? {statement}", ("True", "False")),
    "chat: is-that-correct": ("{statement} Is that correct? Answer yes or no.", ("Yes", "No")),
}


def asked_in_chat(tokenizer, examples: list[Example], question: str, answers: tuple[str, str]) -> list[Example]:
    """Each statement inside ``question`` as a user message of the tokenizer's chat template; its ``choice`` is the
    right one of ``answers`` at the start of the assistant's reply. A template that writes the BOS token itself
    loses it here, since the metric's tokenizer call adds one."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    out = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question.format(statement=ex.text)}],
                                               tokenize=False, add_generation_prompt=True)
        if adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        choice = {"prompt": prompt, "candidates": list(answers), "answer": 0 if ex.label == 1 else 1}
        out.append(Example(text=prompt, label=ex.label, group=ex.group, choice=choice))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=TRUE_FALSE_TASKS, help="comma-separated true/false tasks")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    print("| task | question | accuracy on true statements | on false statements | margin | n |")
    print("|---|---|---|---|---|---|")
    chat = bool(getattr(loaded.tokenizer, "chat_template", None))
    for name in args.tasks.split(","):
        examples = get_task(name).examples(0)
        for key, (question, answers) in {**QUESTIONS, **(CHAT_QUESTIONS if chat else {})}.items():
            t = time.perf_counter()
            asked = (asked_in_chat(loaded.tokenizer, examples, question, answers) if key in CHAT_QUESTIONS
                     else asked_to_judge(examples, question, answers))
            on_true = choice_metric(loaded, [ex for ex in asked if ex.label == 1])
            on_false = choice_metric(loaded, [ex for ex in asked if ex.label == 0])
            margin = (on_true["margin"] * on_true["n"] + on_false["margin"] * on_false["n"]) / (on_true["n"]
                                                                                                 + on_false["n"])
            print(f"| {name} | {key} | {on_true['metric']:.3f} | {on_false['metric']:.3f} | {margin:+.3f} | "
                  f"{on_true['n']} + {on_false['n']} |  <!-- {time.perf_counter() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
