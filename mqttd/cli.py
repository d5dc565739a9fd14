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
import os
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
    "run": ("mqttd.cli:run", "run the broker in the foreground (twistd -n mqttd OPTIONS; "
            "--pidfile PATH: write a crash-safe pid file)"),
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


def _take_pidfile(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """``--pidfile PATH`` / ``--pidfile=PATH`` taken out of ``argv`` (the last one wins)."""
    path, rest, args = None, [], iter(argv)
    for arg in args:
        if arg == "--pidfile":
            path = next(args, "")
        elif arg.startswith("--pidfile="):
            path = arg[len("--pidfile="):]
        else:
            rest.append(arg)
    return path, rest


def run(argv: List[str]) -> int:
    """``twistd -n mqttd ARGV``: the broker in the foreground, logging to stdout.

    The options are validated first: a wrong one is one line on stderr and
    exit status 2 (``--check-config``: the check's result, exit 0).

    No pid file is written unless ``--pidfile PATH`` is given (a foreground
    broker under systemd & co. needs none; twistd's default ``./twistd.pid``
    would refuse a restart after ``kill -9`` while the dead pid is a zombie).
    With ``--pidfile`` the file is locked for the broker's life
    (:mod:`mqttd.pidfile`): a file left by a crash is taken over, one held by
    a running broker is refused with one line and exit status 1.
    """
    from twisted.scripts.twistd import run as twistd_run

    pidfile, argv = _take_pidfile(argv)
    if any(a in ("-h", "--help", "--version") for a in argv):
        pass  # twistd prints them
    else:
        options = _parse_options(argv)
        if options is None:
            return 2
        if options["check-config"]:
            return check_config([a for a in argv if a != "--check-config"])
        if options["cluster"]:
            # before anything below imports the default reactor
            from mqttd.cluster.reactor import require_asyncio_reactor
            require_asyncio_reactor()
    from mqttd.pidfile import PidFile, PidFileError
    from mqttd.service import CannotStart

    pid_file = PidFile(pidfile) if pidfile else None
    if pid_file is not None:
        try:
            stale = pid_file.acquire()
        except PidFileError as error:
            print(f"mqttd: {error}", file=sys.stderr)
            return 1
        if stale is not None and stale != os.getpid():
            print(f"mqttd: pid file {pid_file.path} was left by pid {stale}, which no "
                  f"longer runs a broker; taken over", file=sys.stderr)
        # removed at reactor shutdown too: after SIGTERM twistd ends the
        # process by re-raising the signal, and this function never returns
        from twisted.internet import reactor
        reactor.addSystemEventTrigger("after", "shutdown", pid_file.release)
    # twistd's own pid file is off: ours (or none) is the one
    sys.argv = ["twistd", "-n", "--pidfile=", "mqttd", *argv]
    try:
        twistd_run()  # exits the process itself on a usage error
    except CannotStart as error:  # one line: cannot listen (1), cannot open the store (2)
        print(f"mqttd: {error}", file=sys.__stderr__)
        return error.exit_status
    finally:
        if pid_file is not None:
            pid_file.release()
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
