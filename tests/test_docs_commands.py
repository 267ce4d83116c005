"""Every command the README and docs/ show exists, with flags the command line accepts."""
import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from covidkit.cli import build_parser
from covidkit.stages import stage_arguments

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "input" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:covidkit|torchrun|python -m) [^`]+)`")


def _shell_lines(block: str) -> list[str]:
    """The block's lines, continuations joined and comments cut."""
    text = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines()]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every covidkit / torchrun / python -m command in a code block or an inline span."""
    found = []
    for page in PAGES:
        text = page.read_text()
        lines = [l for b in FENCE.findall(text) for l in _shell_lines(b)]
        lines += [m.group(1) for m in INLINE.finditer(FENCE.sub("", text))]
        for line in lines:
            for command in re.split(r"&&|;", " ".join(line.split())):
                command = command.strip().removeprefix("$ ")
                if command.startswith(("covidkit ", "torchrun ", "python -m covidkit")):
                    found.append((page.relative_to(ROOT).as_posix(), command))
    return found


def _tokens(command: str) -> list[str]:
    # docs notation: [--optional ARG] and a|b alternatives; placeholders stay as words
    command = command.replace("[", " ").replace("]", " ").replace("...", " ")
    return shlex.split(command)


def _subparser(parser: argparse.ArgumentParser, tokens: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Descend through sub-commands; a word that names none where one is required is an error."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return parser, tokens
        if not tokens:  # a command group named in prose (`covidkit bench`)
            return parser, tokens
        if tokens[0] not in subs[0].choices:
            raise AssertionError(f"no sub-command {tokens[:1]} (choices: {', '.join(subs[0].choices)})")
        parser, tokens = subs[0].choices[tokens[0]], tokens[1:]


def _check_flags(parser: argparse.ArgumentParser, tokens: list[str]) -> None:
    known = parser._option_string_actions
    for token in tokens:
        if token.startswith("-") and " " not in token and not re.fullmatch(r"-\d.*", token):
            flag = token.split("=")[0]
            assert flag in known, f"{flag} is not an option (options: {', '.join(sorted(known))})"


def check(command: str) -> None:
    tokens = _tokens(command)
    if tokens[0] == "covidkit":
        parser, rest = _subparser(build_parser(), tokens[1:])
        _check_flags(parser, rest)
        return
    module = tokens[tokens.index("-m") + 1]
    if "<" in module:  # covidkit.stages.<module>: a placeholder
        module = module.split("<")[0].rstrip(".")
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if module.startswith("covidkit.stages."):
        _check_flags(stage_arguments(argparse.ArgumentParser()), tokens[tokens.index("-m") + 2:])


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    pages = {page for page, _ in COMMANDS}
    assert "README.md" in pages and len(COMMANDS) > 30, COMMANDS


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_shown_command_exists(page, command):
    check(command)


@pytest.mark.parametrize("command", [
    "covidkit synthesize --out input",             # no such command
    "covidkit synth --out input --colour red",     # no such flag
    "covidkit bench speed",                        # no such benchmark
    "python -m covidkit.stages.nope --profile full",
    "torchrun --nproc_per_node 2 -m covidkit.stages.study_level --profile full --epochs 3",
])
def test_a_wrong_command_is_caught(command):
    with pytest.raises(AssertionError):
        check(command)
