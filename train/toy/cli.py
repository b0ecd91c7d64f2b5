"""``headprobe toy``: train small transformers from scratch on synthetic tasks, and report on them.

    headprobe toy train --task induction --out runs/toy-induction        (LightningCLI; train/configs/toy_*.yaml)
    headprobe toy train --task induction --steps 300 --model.n_heads 2 --logger csv
    headprobe toy train --task induction --out runs/toy-induction --steps 3000 --resume true
    headprobe toy report runs/toy-induction/model                        (phase-change plot, head ablations)
    headprobe toy tasks                                                  (the tasks and their probing tasks)

Then the whole pipeline on the trained model, with its own probing task:
``headprobe run --model runs/toy-induction/model --tasks [toy_induction] --top_k 1 --sae.layer 1 ...``
(docs/toy-models.md).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from headprobe.train.cli import guarded
from headprobe.train.options import parse_error
from headprobe.train.toy.data import ToyData
from headprobe.train.toy.fit import ToyTrainError, config_path, train_toy
from headprobe.train.toy.model import ToyTransformer

USAGE = """usage: headprobe toy train --task {induction,previous_token,successor} [--out DIR] [options]
       headprobe toy report MODEL_FOLDER [--out DIR]
       headprobe toy tasks

Train a small transformer from scratch on a synthetic task whose mechanism is known (LightningCLI; --task NAME
loads train/configs/toy_NAME.yaml, any option overrides it: `headprobe toy train --task induction --help`), report
on a trained one, or list the tasks. The model is saved as a Hugging Face folder (OUT/model) that
`headprobe run --model OUT/model --tasks [toy_induction]` and every other command read."""
MANAGED = {"logger", "callbacks", "max_epochs", "max_steps", "default_root_dir", "enable_checkpointing"}


class ToyCLI(LightningCLI):
    """LightningCLI as the parser of ``headprobe toy train``: the fit itself is :func:`train_toy`'s."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", type=str, default="runs/toy", help="run folder (the model goes to OUT/model)")
        parser.add_argument("--steps", type=int, default=1500, help="training steps in all (a multiple of "
                            "--data.eval_every)")
        parser.add_argument("--logger", type=str, default="wandb", help="wandb (offline without credentials), csv "
                            "or none")
        parser.add_argument("--project", type=str, default="headprobe", help="W&B project")
        parser.add_argument("--resume", type=bool, default=False, help="continue from OUT/checkpoints/last.ckpt")
        parser.add_argument("--overwrite", type=bool, default=False, help="train afresh into an --out that holds "
                            "a run, deleting its files first")
        parser.add_argument("--progress", type=bool, default=True, help="progress bar")
        parser.link_arguments("data.task", "model.task")

    def instantiate_trainer(self, **kwargs):
        return None  # train_toy builds the Trainer


def expand_task(argv: list[str]) -> list[str]:
    """``--task NAME`` (or ``--task=NAME``) -> ``--config train/configs/toy_NAME.yaml`` first on the line."""
    out, configs = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--task" or arg.startswith("--task="):
            name = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not name:
                raise ToyTrainError("--task needs a name: induction, previous_token or successor")
            configs += ["--config", str(config_path(name))]
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return configs + out


def trainer_overrides(trainer: dict) -> dict:
    """The Trainer settings that differ from Lightning's defaults (what the user set), less those train_toy
    manages."""
    from lightning import Trainer

    defaults = {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()}
    return {k: v for k, v in trainer.items() if k not in MANAGED and k in defaults and v != defaults[k]}


def train(argv: list[str]) -> None:
    argv = expand_task(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            cli = ToyCLI(ToyTransformer, ToyData, run=False, args=argv, save_config_callback=None,
                         seed_everything_default=False,
                         parser_kwargs={"prog": "headprobe toy train", "exit_on_error": False})
        except ArgumentError as err:
            raise ToyTrainError(f"{parse_error(err)} (`headprobe toy train --task induction --help` lists the "
                                f"options)") from None
        except ValueError as err:  # a class refused its settings
            raise ToyTrainError(parse_error(err)) from None
    cfg = cli.config
    result = train_toy(cli.model, cli.datamodule, cfg.out, cfg.steps, logger=cfg.logger, project=cfg.project,
                       resume=cfg.resume, overwrite=cfg.overwrite, progress=cfg.progress,
                       trainer=trainer_overrides(cfg.as_dict().get("trainer") or {}),
                       command=" ".join(["headprobe toy train", *argv]))
    (Path(cfg.out) / "config.yaml").write_text(cli.parser.dump(cfg, skip_none=False))
    print(summary(result))


def summary(result) -> str:
    """A few lines on a finished toy training."""
    losses = ", ".join(f"{k} {v:.3f}" for k, v in result.losses.items())
    jobs = "; ".join(f"{name}: L{j['layer']}.H{j['head']} ({j['score']:.2f}{'' if j['done'] else ', below 0.5'})"
                     for name, j in result.jobs.items())
    change = result.phase_change_step
    return (f"headprobe toy train: {result.task}, {result.steps} steps in {result.seconds:.0f} s; loss {losses}; "
            f"heads {jobs}" + (f"; phase change at step {change}" if change is not None else "")
            + f"\nmodel: {result.folder}")


def report(args: argparse.Namespace) -> None:
    from headprobe.train.toy.report import toy_report

    print(f"headprobe toy report: {toy_report(args.model, args.out)}")


def tasks() -> None:
    from headprobe.extract.tasks import TOY_TASKS
    from headprobe.train.toy.tasks import TASKS

    print(f"{'task':<16}{'probing task':<16}{'stage':<7}jobs / description")
    for name, task in TASKS.items():
        probing = TOY_TASKS[task.probing_task]
        print(f"{name:<16}{task.probing_task:<16}{probing.stage:<7}{', '.join(task.jobs)}")
        print(f"{'':<16}{task.description}; probe label: {probing.description.removeprefix('toy models: ')}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        if rest in ([], ["-h"], ["--help"]):
            print(USAGE)
            return
        guarded("headprobe toy train", lambda: train(rest))
    elif command == "report":
        p = argparse.ArgumentParser(prog="headprobe toy report", description="phase-change plot, head scores and "
                                    "single-head ablations of a trained toy model")
        p.add_argument("model", help="the model folder (OUT/model of `headprobe toy train`)")
        p.add_argument("--out", default=None, help="report folder (default: MODEL/report)")
        args = p.parse_args(rest)
        guarded("headprobe toy report", lambda: report(args))
    elif command == "tasks":
        tasks()
    else:
        print(f"headprobe toy: error: unknown command {command!r}: choose train, report or tasks", file=sys.stderr)
        sys.exit(2)
