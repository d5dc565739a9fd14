"""BrokerService.reload: the seam SIGHUP and feature packages use."""
from twisted.internet import defer, task

from mqttd.broker import Broker
from mqttd.service import BrokerService
from tests.logcapture import logged


def _service():
    clock = task.Clock()
    return BrokerService(clock, Broker(clock), listen=[], sys_interval=0)


def test_reload_runs_every_reloader_and_reports_failures():
    """A failing reloader is reported and does not stop the others."""
    service = _service()
    calls = []
    service.add_reloader("a", lambda: calls.append("a"))

    def broken():
        raise ValueError("bad file")
    service.add_reloader("b", broken)
    service.add_reloader("c", lambda: defer.succeed(calls.append("c")))
    results = []
    service.reload().addCallback(results.append)
    assert results == [{"a": True, "b": False, "c": True}]
    assert calls == ["a", "c"]


def test_registering_a_name_again_replaces_it():
    service = _service()
    calls = []
    service.add_reloader("x", lambda: calls.append(1))
    service.add_reloader("x", lambda: calls.append(2))
    service.reload()
    assert calls == [2]


def _reload_lines(service):
    from twisted.logger import LogLevel
    with logged(LogLevel.info) as lines:
        service.reload()
    return lines


def test_broken_file_on_reload_is_one_error_line_without_traceback():
    """An operator's broken file (ACL, password, TLS, config value) is one ERROR line naming it, no CRITICAL traceback."""
    from twisted.logger import LogLevel

    from mqttd.auth.acl import ACLFileError
    from mqttd.options import ConfigError
    from mqttd.transports.tls import TLSConfigError
    for error in (ACLFileError("acl3:12: invalid topic filter 'a/#/b'"),
                  TLSConfigError("cannot read certKey /x.pem"),
                  ConfigError("--log-level: must be one of debug, info, warn, error"),
                  FileNotFoundError(2, "No such file or directory", "/etc/mqttd/acl")):
        service = _service()

        def broken(error=error):
            raise error
        service.add_reloader("acl_file", broken)
        lines = _reload_lines(service)
        assert [e["log_level"] for e in lines] == [LogLevel.error], lines
        assert "log_failure" not in lines[0]
        text = lines[0]["error"]
        assert text and (str(error) in text), text
        assert "/etc/mqttd/acl" in text if isinstance(error, OSError) else True


def test_a_bug_in_a_reloader_keeps_its_traceback():
    """An unexpected exception (a bug, not a bad file) is still logged with its traceback."""
    service = _service()

    def buggy():
        raise KeyError("oops")
    service.add_reloader("x", buggy)
    lines = _reload_lines(service)
    assert len(lines) == 1 and "log_failure" in lines[0]
