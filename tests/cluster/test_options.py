"""--cluster and its options: validation, one-line errors, the asyncio reactor."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from mqttd.tap import Options, check_report


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_cluster_options_are_parsed_and_the_password_is_not_shown_by_check_config():
    """check-config prints the Redis URL without its password."""
    options = parse("--cluster", "redis://:hunter2@127.0.0.1:6390/1", "--node-id", "edge-1",
                    "--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2")
    assert options["cluster"] == "redis://:hunter2@127.0.0.1:6390/1"
    assert options["node-id"] == "edge-1"
    assert (options["cluster-heartbeat"], options["cluster-node-ttl"]) == (0.5, 2.0)
    report = check_report(options)
    assert "hunter2" not in report and "redis://:***@127.0.0.1:6390/1" in report


@pytest.mark.parametrize("argv, words", [
    (["--cluster", "mysql://h"], "--cluster: unknown scheme"),
    (["--cluster", "redis://h", "--node-id", "a b"], "--node-id: a node id is"),
    (["--node-id", "a"], "--node-id: only with --cluster"),
    (["--cluster-heartbeat", "2"], "--cluster-heartbeat: only with --cluster"),
    (["--cluster", "redis://h", "--cluster-heartbeat", "2", "--cluster-node-ttl", "3"],
     "--cluster-node-ttl: must be at least twice"),
])
def test_wrong_cluster_options_are_one_line_errors(argv, words):
    """Each mistake is named by its option, before anything starts."""
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    assert words in str(info.value)


def test_cluster_options_come_from_the_config_file_too(tmp_path):
    """TOML keys are the option names, as for every option."""
    path = tmp_path / "mqttd.toml"
    path.write_text('cluster = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"\n'
                    'node_id = "n1"\ncluster_node_ttl = 10\n')
    options = parse("--config", str(path))
    assert options["cluster"].startswith("redis+cluster://") and options["node-id"] == "n1"
    assert options["cluster-node-ttl"] == 10.0


def test_another_reactor_than_asyncio_is_refused_with_exit_status_2(tmp_path):
    """redis.asyncio needs the asyncio reactor: twistd --reactor=poll --cluster says so in one line."""
    twistd = Path(sys.executable).parent / "twistd"
    out = subprocess.run([str(twistd), "--reactor=poll", "-n", "--pidfile=", "mqttd",
                          "--persistence", "memory", "--listen", "tcp:0:interface=127.0.0.1",
                          "--cluster", "redis://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert "use twistd --reactor=asyncio" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_cluster_nodes_broker_id_defaults_to_its_node_id():
    """Every node defaulting to --broker-id mqttd made the $SYS/<brokerId>/... trees of all
    nodes collide; with --cluster the default is the node id, an explicit --broker-id wins,
    and a single broker keeps 'mqttd'."""
    from mqttd.cluster.node import default_node_id
    from mqttd.systopics import SysTopics
    assert parse("--cluster", "redis://h", "--node-id", "edge-7").broker_config() \
        .broker_id == "edge-7"
    assert parse("--cluster", "redis://h").broker_config().broker_id == default_node_id()
    assert parse("--cluster", "redis://h", "--node-id", "edge-7", "--broker-id", "east") \
        .broker_config().broker_id == "east"
    assert parse().broker_config().broker_id == "mqttd"
    # the $SYS tree of the node is named by it
    from twisted.internet.task import Clock
    from mqttd.broker import Broker
    clock = Clock()
    broker = Broker(clock, config=parse("--cluster", "redis://h", "--node-id", "edge-7")
                    .broker_config())
    assert SysTopics(broker, clock).prefix == "$SYS/edge-7/"
