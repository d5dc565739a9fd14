"""The ``mqttd`` console script (layer L6).

``mqttd run [options]`` is ``twistd -n mqttd [options]``; every other
subcommand belongs to a feature package and is registered in
:data:`SUBCOMMANDS` by its import path, so this module imports no feature
package until that subcommand is asked for.

Each subcommand is a function ``main(argv: list[str]) -> int`` (the exit
status); ``mqttd SUBCOMMAND --help`` is that function's business.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional, Tuple

#: subcommand -> ("module:function", one-line help).  Feature packages add
#: their line here; keep it sorted.
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "bridge": ("mqttd.bridge.mosquitto:main",
               "bridge import MOSQUITTO.CONF: print the equivalent [[bridge]] TOML"),
    "check-config": ("mqttd.cli:check_config",
                     "check options and config file like 'run' would, then exit"),
    "passwd": ("mqttd.auth.passwd:main",
               "manage a mosquitto-format password file (-c create, -D delete, -b batch, --scram)"),
    "run": ("mqttd.cli:run", "run the broker in the foreground (twistd -n mqttd OPTIONS)"),
    "store": ("mqttd.persistence.storetool:main",
              "check or dump a data directory offline: store check|dump DIR"),
    "why": ("mqttd.admin.cli:main", "why does (not) a message on TOPIC reach CLIENT? "
            "(asks the admin API)"),
}


def _parse_options(argv: List[str]):
    """mqttd's options parsed and validated, or None after a one-line error."""
    from twisted.python import usage

    from mqttd.tap import Options
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        print(f"mqttd: error: {error}", file=sys.stderr)
        return None
    return options


def check_config(argv: List[str]) -> int:
    """``mqttd check-config [options]``: validate like ``run``; 0 if fine, 2 if not."""
    from mqttd.tap import check_report
    options = _parse_options(argv)
    if options is None:
        return 2
    print(check_report(options))
    return 0


def run(argv: List[str]) -> int:
    """``twistd -n mqttd ARGV``: the broker in the foreground, logging to stdout.

    The options are validated first: a wrong one is one line on stderr and
    exit status 2 (``--check-config``: the check's result, exit 0).
    """
    from twisted.scripts.twistd import run as twistd_run

    if any(a in ("-h", "--help", "--version") for a in argv):
        pass  # twistd prints them
    else:
        options = _parse_options(argv)
        if options is None:
            return 2
        if options["check-config"]:
            return check_config([a for a in argv if a != "--check-config"])
    from mqttd.service import CannotStart

    # foreground: no twistd.pid in the working directory (a stale one after
    # kill -9 would refuse the next start; systemd tracks the pid itself)
    sys.argv = ["twistd", "-n", "--pidfile", "", "mqttd", *argv]
    try:
        twistd_run()  # exits the process itself on a usage error
    except CannotStart as error:  # one line, exit 1 (cannot listen, cannot open the store)
        print(f"mqttd: {error}", file=sys.__stderr__)
        return 1
    return 0


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: mqttd SUBCOMMAND [ARGS...]", "", "subcommands:"]
    for name in sorted(SUBCOMMANDS):
        lines.append(f"  {name.ljust(width)}  {SUBCOMMANDS[name][1]}")
    lines.append("")
    lines.append("mqttd SUBCOMMAND --help tells more.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mqttd`` console script; returns the exit status.

    Exit status 2 and the usage on stderr for an unknown or missing subcommand.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from mqttd import __version__
        print(f"mqttd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    entry = SUBCOMMANDS.get(name)
    if entry is None:
        print(f"mqttd: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = entry[0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
