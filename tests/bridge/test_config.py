"""Bridge configuration: mosquitto's topic syntax, TOML tables, errors with lines, import."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mqttd.bridge.config import (
    BridgeConfig, BridgeConfigError, TopicMap, bridges_from_toml, parse_topic_line)
from mqttd.bridge.mosquitto import main as import_main
from mqttd.bridge.mosquitto import parse_mosquitto, to_toml
from mqttd.client import ConstantDelay, DecorrelatedJitter

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.mark.parametrize("line, expected", [
    ("sensors/#", TopicMap("sensors/#", "out", 0)),
    ("sensors/# in", TopicMap("sensors/#", "in", 0)),
    ("sensors/# both 2", TopicMap("sensors/#", "both", 2)),
    ('# out 1 "" site/a/', TopicMap("#", "out", 1, "", "site/a/")),
    ('"" in 1 local/x remote/y', TopicMap("", "in", 1, "local/x", "remote/y")),
])
def test_topic_lines_in_mosquitto_syntax(line, expected):
    """Every form of mosquitto's 'topic' directive parses to the same mapping."""
    assert parse_topic_line(line) == expected


@pytest.mark.parametrize("line, why", [
    ("a/# sideways 1", "direction"),
    ("a/# out 3", "QoS"),
    ("a/# out 1 only-local", "expected PATTERN"),
    ('"" out 1 "" ""', "prefix"),
    ("a/# out 1 lo/+/ re/", "wildcards"),
    ("a/#/b out 1", "filter"),
])
def test_bad_topic_lines_say_what_is_wrong(line, why):
    """A wrong topic line is refused with the reason."""
    with pytest.raises(ValueError, match=why):
        parse_topic_line(line)


def test_topic_map_translates_both_ways():
    """Prefixes are stripped and added per direction; other topics are not mapped."""
    t = parse_topic_line("sensors/# both 1 edge/ site/a/")
    assert t.to_remote("edge/sensors/t") == "site/a/sensors/t"
    assert t.to_local("site/a/sensors/t") == "edge/sensors/t"
    assert t.to_remote("sensors/t") is None


TOML = textwrap.dedent('''\
    listen = "tcp:1883"

    [[bridge]]
    connection = "cloud"
    address = "broker1.example:8883 broker2.example"
    topic = [
        "sensors/# out 1 \\"\\" site/edge-17/",
        "cmd/# in 1 \\"\\" site/edge-17/",
    ]
    remote_clientid = "edge-17"
    restart_timeout = "5 30"
    bridge_protocol_version = "mqttv50"

    [[bridge]]
    connection = "backup"
    address = ["10.0.0.9:1883"]
    topic = "x/# both 2"
    keepalive_interval = 2
    ''')


def test_toml_tables_become_bridge_configs_with_mosquitto_defaults():
    """[[bridge]] keys mirror mosquitto's directives; defaults are mosquitto's."""
    data = tomllib.loads(TOML)
    with pytest.raises(BridgeConfigError) as info:
        bridges_from_toml(data["bridge"], TOML, "mqttd.toml")
    # keepalive_interval 2 is on line 18, in the second table
    assert info.value.line == 18 and "keepalive_interval" in str(info.value)
    fixed = TOML.replace("keepalive_interval = 2", "keepalive_interval = 20")
    cloud, backup = bridges_from_toml(tomllib.loads(fixed)["bridge"], fixed)
    assert cloud.addresses == (("broker1.example", 8883), ("broker2.example", 1883))
    assert cloud.topics[0] == TopicMap("sensors/#", "out", 1, "", "site/edge-17/")
    assert cloud.local_clientid == "local.edge-17"
    assert cloud.notification_topic == "$SYS/broker/connection/edge-17/state"
    assert cloud.protocol_level == 5 and cloud.try_private and not cloud.cleansession
    assert isinstance(cloud.restart_policy(), DecorrelatedJitter)
    assert backup.keepalive_interval == 20 and backup.remote_clientid.endswith(".backup")


@pytest.mark.parametrize("bad, key", [
    ('topic = ["a/# out 7"]', "a/# out 7"),
    ('bridge_protocol_version = "mqttv6"', "bridge_protocol_version"),
    ('restart_timeout = "30 5"', "restart_timeout"),
    ('address = "host:99999"', "address"),
    ('frobnicate = true', "frobnicate"),
    ('cleansession = "yes"', "cleansession"),
])
def test_bad_bridge_settings_name_their_line(bad, key):
    """Each kind of bad value is reported with the line it is on."""
    text = ('[[bridge]]\nconnection = "x"\naddress = "h:1883"\n'
            'topic = ["a/# out 1"]\n') + bad + "\n"
    if bad.startswith(("topic", "address")):
        text = text.replace('topic = ["a/# out 1"]\n', "") if bad.startswith("topic") \
            else text.replace('address = "h:1883"\n', "")
    lines = text.splitlines()
    expected = next(n for n, line in enumerate(lines, 1) if line.startswith(bad.split(" ")[0]))
    with pytest.raises(BridgeConfigError) as info:
        bridges_from_toml(tomllib.loads(text)["bridge"], text, "f.toml")
    assert info.value.line == expected, str(info.value)
    assert key in str(info.value)


def test_duplicate_bridge_names_are_refused():
    """Two bridges with one name would fight over one session."""
    table = {"connection": "x", "address": "h", "topic": "a/#"}
    with pytest.raises(BridgeConfigError, match="two bridges"):
        bridges_from_toml([table, dict(table)])


def test_restart_timeout_policies():
    """'restart_timeout N' is constant; 'BASE CAP' is decorrelated jitter within [base, cap]."""
    assert isinstance(BridgeConfig("x", (("h", 1),), (TopicMap("a"),),
                                   restart_timeout=(7.0,)).restart_policy(), ConstantDelay)
    policy = DecorrelatedJitter(2, 30)
    delays = [policy(n) for n in range(200)]
    assert all(2 <= d <= 30 for d in delays) and max(delays) > 20
    policy.reset()
    assert policy(1) <= 6   # back to uniform(base, 3 * base)


MOSQUITTO_CONF = textwrap.dedent('''\
    listener 1883
    allow_anonymous true

    # the cloud bridge
    connection cloud
    address broker1.example:8883 broker2.example:8883
    topic sensors/# out 1 "" site/edge-17/
    topic cmd/# in 1 "" site/edge-17/
    remote_clientid edge-17
    remote_username edge-17
    remote_password s3cret
    cleansession false
    try_private true
    bridge_protocol_version mqttv311
    keepalive_interval 60
    restart_timeout 5 30
    notifications true
    bridge_cafile /etc/mqttd/ca.pem
    start_type automatic

    connection second
    address 10.1.1.1
    topic # both 0
    ''')


def test_mosquitto_import_round_trips_to_the_same_bridges(tmp_path):
    """The TOML printed for a mosquitto.conf loads to the bridges mosquitto would run."""
    tables, warnings = parse_mosquitto(MOSQUITTO_CONF)
    assert any("start_type" in w for w in warnings)
    text = to_toml(tables)
    cloud, second = bridges_from_toml(tomllib.loads(text)["bridge"], text, check_files=False)
    assert cloud.addresses == (("broker1.example", 8883), ("broker2.example", 8883))
    assert cloud.topics == (TopicMap("sensors/#", "out", 1, "", "site/edge-17/"),
                            TopicMap("cmd/#", "in", 1, "", "site/edge-17/"))
    assert (cloud.remote_username, cloud.remote_password) == ("edge-17", "s3cret")
    assert cloud.cafile == "/etc/mqttd/ca.pem" and cloud.restart_timeout == (5.0, 30.0)
    assert second.topics == (TopicMap("#", "both", 0),)


def test_mosquitto_import_names_the_bad_line(tmp_path, capsys):
    """A bad directive in mosquitto.conf fails with exit 2 and its line number."""
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.replace("topic # both 0", "topic # both 5"))
    assert import_main(["import", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "line 23" in err and "QoS" in err
    conf.write_text(MOSQUITTO_CONF)
    assert import_main(["import", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "[[bridge]]" in out and 'connection = "cloud"' in out


def test_console_script_bridge_import(tmp_path):
    """'mqttd bridge import FILE' is registered in the console script."""
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF)
    result = subprocess.run([sys.executable, "-m", "mqttd.cli", "bridge", "import", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["bridge"][1]["connection"] == "second"


def test_bad_bridge_in_broker_config_exits_2_with_the_line(tmp_path):
    """twistd mqttd --config with a bad [[bridge]] stops at startup: exit 2, file and line."""
    config = tmp_path / "mqttd.toml"
    config.write_text('[[bridge]]\nconnection = "x"\naddress = "h"\n'
                      'topic = ["a/# out 1", "b/# up 1"]\n')
    from pathlib import Path
    twistd = [str(Path(sys.executable).parent / "twistd")]
    result = subprocess.run([*twistd, "-n", "--pidfile", "", "mqttd", "--config", str(config),
                             "--persistence", "memory"],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 2
    assert f"{config}, line 4" in result.stderr and "b/# up 1" in result.stderr


def test_check_config_lists_the_bridges(tmp_path):
    """'mqttd check-config' validates [[bridge]] tables and lists them; a bad one exits 2."""
    from mqttd.cli import main as cli_main
    config = tmp_path / "mqttd.toml"
    config.write_text('[[bridge]]\nconnection = "up"\naddress = "h1:1884 h2"\n'
                      'topic = ["a/# out 1"]\n')
    assert cli_main(["check-config", "--config", str(config)]) == 0
    config.write_text('[[bridge]]\nconnection = "up"\naddress = "h1:1884"\n'
                      'topic = ["a/# out 1"]\nkeepalive_interval = 1\n')
    assert cli_main(["check-config", "--config", str(config)]) == 2


def test_reload_from_a_bad_file_keeps_the_running_bridges(tmp_path):
    """SIGHUP with a broken [[bridge]] raises (logged by BrokerService.reload); nothing changes."""
    from twisted.internet.task import Clock

    from mqttd.bridge.service import BridgeManager, load_bridges
    from mqttd.broker import Broker
    config = tmp_path / "mqttd.toml"
    config.write_text('[[bridge]]\nconnection = "up"\naddress = "h1"\ntopic = ["a/# out 1"]\n')
    configs = load_bridges(str(config))
    manager = BridgeManager(Broker(Clock()), Clock(), configs, str(config),
                            endpoint_factory=lambda reactor, c: None)
    config.write_text('[[bridge]]\nconnection = "up"\naddress = "h1"\ntopic = ["a/# out 9"]\n')
    failures = []
    manager.reload().addErrback(failures.append)
    assert failures and isinstance(failures[0].value, BridgeConfigError)
    assert "line 4" in str(failures[0].value)
    assert list(manager.bridges) == ["up"]


@pytest.mark.parametrize("insecure", [False, True])
def test_bridge_tls_client_certificate_uses_no_deprecated_pyopenssl_api(tmp_path, insecure):
    """bridge_certfile/keyfile reach pyOpenSSL as cryptography objects: no DeprecationWarning."""
    import warnings

    from types import SimpleNamespace

    from transports.certs import PKI
    from twisted.internet.protocol import Factory

    from mqttd.bridge.service import _tls_options

    pki = PKI(tmp_path / "pki")
    chain = tmp_path / "alice-chain.pem"
    chain.write_bytes(pki.alice_cert.read_bytes() + pki.ca.cert_path.read_bytes())
    config = BridgeConfig(connection="tls", addresses=[("localhost", 8883)],
                          topics=[parse_topic_line("# out 1")], cafile=str(pki.ca.cert_path),
                          certfile=str(chain), keyfile=str(pki.alice_key), insecure=insecure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = _tls_options(config, "localhost")
        # the context is built lazily (per connection since Twisted 26): make one
        tls_protocol = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=Factory()))
        if hasattr(options, "clientConnectionForTLS"):
            options.clientConnectionForTLS(tls_protocol)
        else:
            options.getContext()
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert deprecations == []


def _handshake(client_options, server_key, server_cert) -> str:
    """An in-memory TLS handshake of the bridge's client options against a server: "ok" or the error."""
    from types import SimpleNamespace

    from OpenSSL import SSL
    from twisted.internet import ssl
    from twisted.internet.protocol import Factory

    from mqttd.transports.tls import load_certificates, load_private_key
    server = SSL.Connection(ssl.CertificateOptions(
        privateKey=load_private_key(str(server_key)),
        certificate=load_certificates(str(server_cert))[0]).getContext(), None)
    server.set_accept_state()
    failed = []
    proto = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=Factory()),
                            failVerification=failed.append)
    if hasattr(client_options, "clientConnectionForTLS"):
        client = client_options.clientConnectionForTLS(proto)
    else:
        client = SSL.Connection(client_options.getContext(), None)
    client.set_connect_state()
    done = set()
    for _ in range(20):   # a handshake takes a few round trips
        for name, conn in (("client", client), ("server", server)):
            try:
                conn.do_handshake()
                done.add(name)
            except SSL.WantReadError:
                pass
            except SSL.Error as error:
                return f"{name}: {error}"
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == {"client", "server"}:
            return "ok" if not failed else f"verification: {failed[0]}"
    return "no handshake"


@pytest.mark.parametrize("order", ["other-ca first", "ca first"])
def test_bridge_cafile_bundle_trusts_every_certificate(tmp_path, order):
    """A CA bundle in bridge_cafile trusts each of its certificates, in either order, as mosquitto does (REVIEW-BRIDGE 9a)."""
    from transports.certs import PKI

    from mqttd.bridge.service import _tls_options
    pki = PKI(tmp_path / "pki")
    parts = [pki.other_ca.cert_path.read_bytes(), pki.ca.cert_path.read_bytes()]
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(parts if order == "other-ca first" else parts[::-1]))
    for insecure in (False, True):
        config = BridgeConfig(connection="b", addresses=[("localhost", 8883)],
                              topics=[parse_topic_line("# out 1")], cafile=str(bundle),
                              insecure=insecure)
        assert _handshake(_tls_options(config, "localhost"), pki.server_key,
                          pki.server_cert) == "ok", insecure
    # and a bundle without the server's CA still refuses it
    alone = BridgeConfig(connection="b", addresses=[("localhost", 8883)],
                         topics=[parse_topic_line("# out 1")],
                         cafile=str(pki.other_ca.cert_path))
    assert "certificate verify failed" in _handshake(
        _tls_options(alone, "localhost"), pki.server_key, pki.server_cert)


@pytest.mark.parametrize("what", ["missing cafile", "garbage cafile", "missing certfile",
                                  "garbage keyfile", "key of another certificate"])
def test_bad_bridge_tls_files_fail_check_config_and_startup_with_the_line(tmp_path, what,
                                                                          capsys):
    """A missing or non-PEM bridge_cafile/certfile/keyfile: check-config and run exit 2 with one line naming file, line and bridge (REVIEW-BRIDGE 4a)."""
    from transports.certs import PKI

    from mqttd.cli import main as cli_main
    pki = PKI(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    files = {"bridge_cafile": str(pki.ca.cert_path), "bridge_certfile": str(pki.alice_cert),
             "bridge_keyfile": str(pki.alice_key)}
    key, value = {
        "missing cafile": ("bridge_cafile", str(tmp_path / "nonexistent.pem")),
        "garbage cafile": ("bridge_cafile", str(garbage)),
        "missing certfile": ("bridge_certfile", str(tmp_path / "nonexistent.pem")),
        "garbage keyfile": ("bridge_keyfile", str(garbage)),
        "key of another certificate": ("bridge_keyfile", str(pki.mallory_key)),
    }[what]
    files[key] = value
    config = tmp_path / "mqttd.toml"
    body = "".join(f'{k} = "{v}"\n' for k, v in files.items())
    config.write_text('listen = "tcp:0:interface=127.0.0.1"\n[[bridge]]\nconnection = "c"\n'
                      f'address = "127.0.0.1:1"\ntopic = "a/# out 1"\n{body}')
    line = 6 + list(files).index(key)
    assert cli_main(["check-config", "--config", str(config), "--persistence", "memory"]) == 2
    err = capsys.readouterr().err
    assert f"line {line}" in err and "'c'" in err and value in err, err
    from pathlib import Path
    twistd = [str(Path(sys.executable).parent / "twistd")]
    result = subprocess.run([*twistd, "-n", "--pidfile", "", "mqttd", "--config", str(config),
                             "--persistence", "memory"],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"{config}, line {line}" in result.stderr and value in result.stderr


def test_mosquitto_import_reads_the_older_clientid_username_password_names(tmp_path, capsys):
    """mosquitto's conf.c reads clientid/username/password as remote_*: the import keeps the identity and credentials (REVIEW-BRIDGE 5a)."""
    conf = tmp_path / "m.conf"
    conf.write_text("connection cloud\naddress 127.0.0.1:1884\ntopic sensors/# out 1\n"
                    "clientid edge-17\nusername edge\npassword s3cret\n")
    assert import_main(["import", str(conf)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    (bridge,) = tomllib.loads(captured.out)["bridge"]
    assert (bridge["remote_clientid"], bridge["remote_username"],
            bridge["remote_password"]) == ("edge-17", "edge", "s3cret")


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False),
                                             ("true", True), ("false", False)])
def test_mosquitto_import_reads_mosquitto_booleans(value, expected):
    """mosquitto's booleans are true/false/1/0 (conf__parse_bool); the import reads all four."""
    tables, _ = parse_mosquitto(f"connection c\naddress h\ntopic # out 0\n"
                                f"try_private {value}\ncleansession {value}\n")
    assert tables[0]["try_private"] is expected and tables[0]["cleansession"] is expected


def test_mosquitto_import_refuses_booleans_mosquitto_refuses(tmp_path, capsys):
    """'yes' is not a mosquitto boolean (mosquitto stops: Invalid try_private value): exit 2, one line with file and line."""
    conf = tmp_path / "m.conf"
    conf.write_text("connection c\naddress h\ntopic # out 0\ntry_private yes\n")
    assert import_main(["import", str(conf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{conf}, line 4" in err[0] and "try_private" in err[0]


def test_mosquitto_import_follows_include_dir(tmp_path, capsys):
    """Debian's layout: mosquitto.conf holds 'include_dir conf.d' and the bridge lives in conf.d/*.conf (read in name order)."""
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "b-second.conf").write_text("connection second\naddress 10.0.0.2\ntopic # both 0\n")
    (confd / "a-first.conf").write_text("connection first\naddress 10.0.0.1\n"
                                        "topic a/# out 1\nkeepalive_interval 1\n")
    (confd / "ignored.txt").write_text("connection nope\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"pid_file /run/mosquitto.pid\ninclude_dir {confd}\n")
    assert import_main(["import", str(conf)]) == 2   # the bad value: named in its own file
    err = capsys.readouterr().err
    assert f"{confd / 'a-first.conf'}, line 4" in err and "keepalive" in err, err
    (confd / "a-first.conf").write_text("connection first\naddress 10.0.0.1\ntopic a/# out 1\n")
    assert import_main(["import", str(conf)]) == 0
    names = [b["connection"] for b in tomllib.loads(capsys.readouterr().out)["bridge"]]
    assert names == ["first", "second"]


@pytest.mark.parametrize("directive", ["bridge_capath /etc/ssl/certs",
                                       "bridge_identity edge\nbridge_psk 0123abcd"])
def test_mosquitto_import_refuses_tls_it_cannot_express(tmp_path, capsys, directive):
    """A TLS bridge by bridge_capath or PSK never becomes a plaintext bridge carrying the password: exit 2, one line (REVIEW-BRIDGE 5b)."""
    conf = tmp_path / "m.conf"
    conf.write_text("connection cloud\naddress h:8883\ntopic # out 1\nremote_username u\n"
                    f"remote_password p\n{directive}\n")
    assert import_main(["import", str(conf)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert f"{conf}, line 6" in err[0] and directive.split()[0] in err[0]


@pytest.mark.parametrize("line, expected", [
    ("it's/# out 1", TopicMap("it's/#", "out", 1)),
    ("a\\b/# out 1", TopicMap("a\\b/#", "out", 1)),
    ("a/#   both   2  \"\"   r/", TopicMap("a/#", "both", 2, "", "r/")),
    ("'q'/# in 0 l/ 'r'/", TopicMap("'q'/#", "in", 0, "l/", "'r'/")),
])
def test_topic_lines_split_as_mosquitto_not_as_a_shell(line, expected):
    """mosquitto splits topic lines on blanks only; ' and \\ are topic characters, "" is the empty string (REVIEW-BRIDGE 4c)."""
    assert parse_topic_line(line) == expected
    assert parse_topic_line(expected.line()) == expected   # and the import writes it back


@pytest.mark.parametrize("text, expected", [
    ("[::1]:1884", ("::1", 1884)),
    ("[::1]", ("::1", 1883)),
    ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
    ("host.example", ("host.example", 1883)),
    ("10.0.0.1:8883", ("10.0.0.1", 8883)),
])
def test_addresses_parse_hosts_ports_and_bracketed_ipv6(text, expected):
    """HOST[:PORT] and [IPV6][:PORT] give the right host and port."""
    from mqttd.bridge.config import parse_address
    assert parse_address(text, 1883) == expected


@pytest.mark.parametrize("value, why", [
    ('"::1"', "brackets"),
    ('"fe80::1:1883"', "brackets"),
    ("18841", "must be a string"),
    ('"18841"', "no host"),
    ('"[::1]x"', "IPV6"),
    ('"[::1"', "IPV6"),
])
def test_ambiguous_or_hostless_addresses_are_refused_with_the_line(value, why):
    """'::1' is not host ':' port 1 and 18841 is not a host: refused, naming the line (REVIEW-BRIDGE 4b)."""
    text = f'[[bridge]]\nconnection = "x"\ntopic = "a/# out 1"\naddress = {value}\n'
    with pytest.raises(BridgeConfigError, match=why) as info:
        bridges_from_toml(tomllib.loads(text)["bridge"], text, "f.toml")
    assert info.value.line == 4
