"""The ``mqttd`` console script's dispatcher."""
import importlib

import pytest

from mqttd import cli


def test_every_subcommand_resolves_to_a_function():
    """A registered subcommand that does not import is a broken console script."""
    for name, (target, help_text) in cli.SUBCOMMANDS.items():
        module_name, function_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name)), name
        assert help_text


def test_unknown_subcommand_exits_2(capsys):
    """An unknown subcommand is a usage error: exit 2 and the list on stderr."""
    assert cli.main(["no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand" in err and "run" in err


def test_no_subcommand_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: mqttd" in capsys.readouterr().err


def test_version(capsys):
    from mqttd import __version__
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mqttd {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_help_lists_subcommands(flag, capsys):
    assert cli.main([flag]) == 0
    assert "run" in capsys.readouterr().out
