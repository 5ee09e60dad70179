"""loadsvc/cli.py: every flag's help, subcommand usage errors, --log-level on either side."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator

import pytest

from loadsvc.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser,
             path: str = "loadsvc") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for the top level and every subcommand, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action.choices, dict):  # a subparsers action: name -> parser
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_says_what_it_does_and_its_default() -> None:
    """Each argument of each command has help; one with a default (not None or off) names it."""
    missing = []
    commands = dict(_parsers(build_parser()))
    assert {"loadsvc engine", "loadsvc router", "loadsvc keys gen", "loadsvc bench soak"} <= set(commands)
    for path, parser in commands.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action.choices, dict):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip():
                missing.append(f"{path} {name}: no help")
            elif action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
                missing.append(f"{path} {name}: its default {action.default!r} is not in its help")
        parser.format_help()  # every %(default)s expands
    assert missing == []


def test_units_are_named() -> None:
    helps = {path: parser.format_help() for path, parser in _parsers(build_parser())}
    assert "publishes per second per rank (default 20.0)" in " ".join(helps["loadsvc simulate"].split())
    assert "in tokens (default 65536)" in " ".join(helps["loadsvc engine"].split())


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
    finally:  # main() configures logging for the process; leave the test session's alone
        root.handlers[:], root.level = handlers, level
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("argv, command, unknown", [
    (["get", "--port", "50051"], "loadsvc get", "--port 50051"),
    (["watch", "--bogus"], "loadsvc watch", "--bogus"),
    (["keys", "gen", "dir", "name", "--bogus"], "loadsvc keys gen", "--bogus"),
    (["bench", "shm", "--bogus"], "loadsvc bench shm", "--bogus"),
])
def test_a_wrong_flag_after_a_command_shows_that_commands_usage(capsys, argv, command, unknown) -> None:
    code, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith(f"usage: {command} "), err
    assert err.endswith(f"{command}: error: unrecognized arguments: {unknown}\n"), err


def test_log_level_is_accepted_after_the_command(capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(["get", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "ERROR", "get"]).log_level == "ERROR"
    assert parser.parse_args(["get"]).log_level == "INFO"
    assert parser.parse_args(["keys", "gen", "d", "n", "--log-level", "WARNING"]).log_level == "WARNING"
    code, err = _run(capsys, "get", "--log-level", "LOUD")
    assert code == 2 and err.startswith("usage: loadsvc get ") and "--log-level: invalid choice" in err
