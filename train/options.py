"""Option conventions shared by every ``headprobe`` command.

One spelling: ``--snake_case`` names, as LightningCLI and jsonargparse give ``headprobe train`` and ``headprobe
run``; the argparse commands (``extract``, ``attribute``, ``hub``) also accept the ``--kebab-case`` spelling. A
yes/no option is a flag that also takes a value: ``--resume``, ``--resume true`` and ``--resume false`` work in
every command.
"""
from __future__ import annotations

import argparse
import errno
import re

from headprobe import HeadprobeError

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def boolean(text: str) -> bool:
    """'true'/'false' (also yes/no, 1/0) as a bool, for flags given a value."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: pass true or false")


def add_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A yes/no option: ``--name``, ``--name true`` or ``--name false`` (``--name-with-dashes`` too)."""
    parser.add_argument(*kebab_aliases(name), nargs="?", const=True, default=False, type=boolean, help=help)


def kebab_aliases(name: str) -> list[str]:
    """``--snake_name`` and, where it differs, ``--snake-name``: the names of one option."""
    return [name] + ([name.replace("_", "-")] if "_" in name else [])


def level(text: str) -> float:
    """A level strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a level between 0 and 1, such as 0.01")
    return value


def at_least_two(text: str) -> int:
    """A count of random draws: at least 2."""
    if not text.lstrip("-").isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: the prediction interval needs at least 2 random draws")
    return int(text)


def expand_bare_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``--flag`` with no value after it -> ``--flag true``, for parsers (jsonargparse) whose bool options need a
    value; ``--flag false`` and ``--flag=true`` pass unchanged."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


def parse_error(err: Exception) -> str:
    """jsonargparse's many-line parse error as one line: the innermost option and what was wrong with it."""
    message = str(err)
    keys = re.findall(r'Parser key "([^"]+)":', message)
    if not keys and not message.startswith("Does not validate"):
        return first_line(err)
    lines = [re.sub(r"^\s*- ", "", line).strip() for line in
             (message.split(f'Parser key "{keys[-1]}":', 1)[1] if keys else message).strip().splitlines()]
    clean = lambda text: re.sub(r"(?:a )?typing\.Literal\[(.*?)\]", r"one of \1", re.sub(
        r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)).replace("NoneType", "null")
    noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given class_path", "Expected a")
    specific = [line for line in lines if line and not line.startswith(noise)]
    got = next((line for line in lines if ". Got value: " in line), None)
    expected = [clean(m) for line in lines for m in re.findall(r"Expected a (<class '[\w.]+'>)", line)]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), "")
    detail = (clean(got) if got else specific[0] if specific
              else f"expected {' or '.join(expected)}, got {given!r}" if expected else lines[0])
    return f"--{'.'.join(keys)}: {detail}" if keys else detail


def first_line(err: BaseException) -> str:
    """An error message's first line (its type's name when it has none)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def one_line(err: BaseException) -> str:
    """An error's first line; an OS error on a path says which path and what to do."""
    if isinstance(err, OSError) and not isinstance(err, HeadprobeError):
        where = err.filename or "a file"
        if err.errno == errno.ENOSPC:
            return f"{where}: no space left on the device: free some space (finished work is kept), then run again"
        if err.strerror:
            return f"{where}: {err.strerror.lower()}: pass another path"
    return first_line(err)
