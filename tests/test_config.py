"""Config that cannot be wrong silently: every option typed, ranged, documented."""
import pathlib
import re
import subprocess
import sys

import attrs
import pytest
from twisted.python import usage

from mqttd import __version__, cli, tap
from mqttd.broker import BrokerConfig
from mqttd.options import ConfigError

README = pathlib.Path(__file__).resolve().parents[1] / "README.rst"


def _parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize("argv, fragment", [
    (["--connect-timeout", "-1"], "--connect-timeout: must be greater than 0"),
    (["--connect-timeout", "0"], "--connect-timeout: must be greater than 0"),
    (["--max-inflight", "0"], "--max-inflight: must be at least 1, got 0"),
    (["--max-inflight", "70000"], "--max-inflight: must be at most 65535"),
    (["--max-packet-size", "1"], "--max-packet-size: must be at least 14, got 1"),
    (["--max-inflight", "ten"], "--max-inflight: expected an integer, got 'ten'"),
    (["--max-inflight", "1.5"], "--max-inflight: expected an integer"),
    (["--sys-interval", "often"], "--sys-interval: expected a number"),
    (["--sys-interval", "nan"], "--sys-interval: expected a finite number"),
    (["--port", "70000"], "--port: must be at most 65535"),
    (["--max-keepalive", "-5"], "--max-keepalive: must be at least 0"),
    (["--max-queued-messages", "0"], "--max-queued-messages: must be at least 1"),
    (["--overflow-policy", "drop-everything"], "--overflow-policy: must be one of"),
    (["--log-level", "loud"], "--log-level: must be one of debug, info, warn, error"),
    (["--persistence", "redis"], "--persistence: unknown persistence spec"),
    (["--fsync", "sometimes"], "--fsync: fsync must be"),
    (["--listen", "nosuchkind:1883"], "--listen: not a valid server endpoint"),
    (["--broker-id", "a/b"], "--broker-id: must be one topic level"),
])
def test_bad_value_is_a_one_line_error_naming_the_option(argv, fragment):
    """Each wrong value is refused before anything starts, with one line naming the option."""
    with pytest.raises(ConfigError) as info:
        _parse(*argv)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_valid_values_reach_the_broker_config():
    """Checked values are converted to their types and land in BrokerConfig."""
    config = _parse("--connect-timeout", "2.5", "--max-inflight", "7", "--max-packet-size",
                    "1024", "--max-session-expiry", "60", "--queue-qos0").broker_config()
    assert (config.connect_timeout, config.max_inflight, config.max_packet_size,
            config.max_session_expiry, config.queue_qos0) == (2.5, 7, 1024, 60, True)


@pytest.mark.parametrize("line, fragment", [
    ('max_inflight = "10"', "must be a number, not the string '10'"),
    ("max_inflight = 1.5", "--max-inflight: expected an integer, got 1.5 (float)"),
    ("max_inflight = true", "--max-inflight: expected an integer, got True (bool)"),
    ("connect-timeout = -1", "--connect-timeout: must be greater than 0"),
    ('queue-qos0 = "yes"', "--queue-qos0: expected true or false"),
    ("max_queue = 1", "unknown key 'max_queue'"),
    ("listen = [1883]", "--listen: expected a string, got 1883 (int)"),
    ("max_inflight = ", "cannot read"),
])
def test_bad_file_value_is_a_one_line_error(tmp_path, line, fragment):
    """A TOML file is checked as strictly as the command line, types included."""
    config = tmp_path / "mqttd.toml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        _parse("--config", str(config))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_command_line_port_replaces_the_files_addresses(tmp_path):
    """--port on the command line wins over the file's port and listen (not added to them)."""
    config = tmp_path / "mqttd.toml"
    config.write_text('port = 1884\nlisten = ["tcp:1999"]\nmax-inflight = 5\n')
    assert _parse("--config", str(config))["listen"] == ["tcp:1999", "tcp:1884"]
    options = _parse("--config", str(config), "--port", "1885")
    assert options["listen"] == ["tcp:1885"]
    assert options.broker_config().max_inflight == 5
    assert _parse("--config", str(config), "--max-inflight", "6").broker_config().max_inflight == 6


def test_sources_say_where_each_value_came_from(tmp_path):
    """check-config reports whether a value came from the command line or the file."""
    config = tmp_path / "mqttd.toml"
    config.write_text("max-inflight = 5\n")
    options = _parse("--config", str(config), "--broker-id", "b")
    assert options.sources["max-inflight"] == str(config)
    assert options.sources["broker-id"] == "command line"
    assert options.sources["max-queued-messages"] == "default"
    report = tap.check_report(options)
    assert report.startswith("mqttd: configuration OK")
    assert f"max-inflight = 5  ({config})" in report


def test_broker_config_validates_for_embedders_too():
    """BrokerConfig's attrs validators give an embedder the same one-line errors."""
    with pytest.raises(ValueError, match="max_inflight: must be at least 1"):
        BrokerConfig(max_inflight=0)
    with pytest.raises(TypeError, match="max_inflight: expected an integer"):
        BrokerConfig(max_inflight="10")
    with pytest.raises(ValueError, match="connect_timeout: must be greater than 0"):
        BrokerConfig(connect_timeout=-1)
    with pytest.raises(TypeError, match="queue_qos0: expected true or false"):
        BrokerConfig(queue_qos0="yes")
    BrokerConfig(max_session_expiry=None)  # None: unlimited


def test_option_defaults_are_the_broker_config_defaults():
    """The documented default of an option that sets a BrokerConfig field is that field's default."""
    fields = {f.name: f.default for f in attrs.fields(BrokerConfig)}
    for opt in tap.OPTIONS:
        if opt.field is not None and not opt.is_flag and not opt.repeatable:
            assert opt.default == fields[opt.field], opt.name


def _readme_options():
    text = README.read_text()
    rows = {}
    for match in re.finditer(r"^   \* - ``--([a-z0-9-]+)[^`]*``\n     - (.*)$", text, re.M):
        rows[match.group(1)] = match.group(2).strip()
    return rows


def test_readme_options_table_matches_the_option_definitions():
    """Every option is in the README table with its real default, and nothing else is."""
    rows = _readme_options()
    defined = {o.name: o for o in tap.OPTIONS}
    assert sorted(rows) == sorted(defined)
    for name, cell in rows.items():
        documented = re.sub(r"\s*\(.*\)$", "", cell)  # "``0`` (any)" -> "``0``"
        assert documented == defined[name].documented_default(), name


def test_every_option_is_accepted_on_the_command_line_and_in_the_file():
    """usage.Options knows every option of the table (nothing defined but unparseable)."""
    known = {p[0] for p in tap.Options.optParameters} | {f[0] for f in tap.Options.optFlags}
    known |= {o.name for o in tap.OPTIONS  # repeatable: an opt_NAME method each
              if hasattr(tap.Options, "opt_" + o.name.replace("-", "_"))}
    assert {o.name for o in tap.OPTIONS} == known


def test_version_option_prints_mqttds_version(capsys):
    """twistd mqttd --version is mqttd's version, not twistd's."""
    with pytest.raises(SystemExit) as info:
        _parse("--version")
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mqttd {__version__}"


def test_mqttd_run_refuses_a_bad_option_with_one_line_and_status_2(capsys):
    """mqttd run validates before handing over to twistd."""
    assert cli.main(["run", "--max-inflight", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mqttd: error: --max-inflight: must be at least 1, got 0"


def test_check_config_subcommand(tmp_path, capsys):
    """mqttd check-config: 0 and a summary when fine, 2 and one line when not."""
    good = tmp_path / "good.toml"
    good.write_text('persistence = "memory"\nmax-inflight = 10\n')
    assert cli.main(["check-config", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out and "max-inflight = 10" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("max-packet-size = 1\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        "mqttd: error: --max-packet-size: must be at least 14, got 1")
    assert cli.main(["run", "--check-config", "--config", str(good)]) == 0


def _twistd(*argv):
    twistd = pathlib.Path(sys.executable).parent / "twistd"
    return subprocess.run([str(twistd), "-n", "--pidfile", "", "mqttd", *argv],
                          capture_output=True, text=True, timeout=60)


def test_twistd_mqttd_bad_option_exits_2_with_one_line():
    """Under plain twistd too: one line on stderr, exit 2, no usage dump, no traceback."""
    result = _twistd("--max-packet-size", "1", "--persistence", "memory")
    assert result.returncode == 2
    assert result.stderr.strip() == "mqttd: error: --max-packet-size: must be at least 14, got 1"
    unknown = _twistd("--no-such-option")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "mqttd: error: option --no-such-option not recognized"]


def test_twistd_mqttd_check_config_exits_0_without_listening():
    """--check-config reports and exits 0 before anything listens."""
    result = _twistd("--check-config", "--persistence", "memory", "--listen", "tcp:1")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_config_never_prints_a_secret(capsys):
    """check-config output lands in terminals and CI logs: tokens and cred passwords are ***."""
    assert cli.main(["check-config", "--persistence", "memory", "--listen", "tcp:0",
                     "--admin-token", "s3cret", "--auth", "memory:bob:pw-of-bob",
                     "--auth", "unix"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "pw-of-bob" not in out
    assert "admin-token = '***'  (command line)" in out
    assert "auth = ['memory:***', 'unix']  (command line)" in out


def test_check_config_lists_the_addresses_once(capsys):
    """--listen (and --port) make one 'listen =' line with where they came from."""
    assert cli.main(["check-config", "--persistence", "memory", "--listen", "tcp:0"]) == 0
    out = capsys.readouterr().out
    assert out.count("listen = ") == 1
    assert "  listen = ['tcp:0']  (command line)" in out


def test_admin_user_without_an_authenticator_is_refused():
    """--admin-user with nothing to check its password could never log in: say so at once."""
    with pytest.raises(ConfigError, match="--admin-user: needs --password-file or --auth"):
        _parse("--persistence", "memory", "--admin-user", "bob", "--admin-listen", "tcp:0")
    options = _parse("--persistence", "memory", "--admin-user", "bob",
                     "--auth", "memory:bob:pw")
    assert options["admin-user"] == ["bob"]


def test_listener_limit_for_an_endpoint_not_listened_on_is_refused():
    """A typo in --listener-max-connections' endpoint is an error, not a limit never applied."""
    with pytest.raises(ConfigError, match="'tcp:1' is not one of the --listen endpoints"):
        _parse("--persistence", "memory", "--listen", "tcp:0",
               "--listener-max-connections", "tcp:1=5")
    with pytest.raises(ConfigError, match="not one of the --listen endpoints"):
        _parse("--persistence", "memory", "--port", "1884",
               "--listener-max-connections", "tcp:1883=5")
    ok = _parse("--persistence", "memory", "--port", "1884",
                "--listener-max-connections", "tcp:1884=5")
    assert ok["listener-max-connections"] == ["tcp:1884=5"]


@pytest.mark.parametrize("text", ["max-inflight = 10\nmax_inflight = 20\n",
                                  "log_level = 'warn'\nlog-level = 'debug'\n"])
def test_the_same_option_twice_in_the_file_is_refused(tmp_path, text):
    """'-' and '_' spell the same key: giving both is an error, not 'the last one wins'."""
    config = tmp_path / "mqttd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="are the same option --"):
        _parse("--config", str(config))


def test_auth_file_that_does_not_exist_is_refused(tmp_path):
    """--auth file:PATH with no such file is a one-line error, not a warning and a broker
    that refuses every client (strcred only warns)."""
    from mqttd.tap import _strcred
    with pytest.raises(ValueError, match="no such file"):
        _strcred(f"file:{tmp_path / 'missing'}")
    existing = tmp_path / "users"
    existing.write_text("u1:secret\n")
    _strcred(f"file:{existing}")
