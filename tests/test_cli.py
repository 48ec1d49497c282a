"""The ``llmarch`` command itself: ``--version`` and a ``--help`` that lists every command."""

import argparse
import importlib.metadata
import re

import pytest

from llmarch import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"llmarch {importlib.metadata.version('llmarch')}\n"


def test_help_lists_every_command_with_one_line(capsys):
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {action.dest: action.help for action in sub._choices_actions}
    assert set(helps) == set(sub.choices) >= {"demo", "train", "eval", "generate", "plot"}
    assert all(text and "\n" not in text for text in helps.values()), helps
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "The ``llmarch`` command" not in text and text.startswith("usage: llmarch")
    for name in helps:  # "  train   train a model; ..." in the listing
        assert re.search(rf"^\s+{name}\s+\S", text, re.MULTILINE), name
