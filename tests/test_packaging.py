"""Packaging hygiene: every declared dependency is used, nothing mqttd imports is deprecated."""
import configparser
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: distribution name -> import name, where they differ
IMPORT_NAMES = {"pyOpenSSL": "OpenSSL", "zope.interface": "zope.interface", "prometheus_client": "prometheus_client"}


def _requirements(section: str, key: str):
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    raw = config[section][key]
    names = []
    for line in raw.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s<>=!;\[]", line, 1)[0])
    return names


def _source(paths):
    return "\n".join(p.read_text() for base in paths for p in base.rglob("*.py"))


def test_every_install_requirement_is_imported_by_mqttd():
    """A dependency declared in install_requires but never imported is dead weight."""
    code = _source([ROOT / "mqttd", ROOT / "twisted"])
    for name in _requirements("options", "install_requires"):
        module = IMPORT_NAMES.get(name, name.replace("-", "_").lower())
        assert re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", code, re.M), (
            f"{name} is declared in install_requires but mqttd never imports {module}")


def test_every_test_requirement_is_used_by_the_tests():
    """The test extra lists only what the tests import (or pytest plugins they use)."""
    code = _source([ROOT / "tests"])
    config = (ROOT / "setup.cfg").read_text()
    plugins = {"pytest-timeout": "timeout = ", "pytest": "import pytest"}
    for name in _requirements("options.extras_require", "test"):
        if name in plugins:
            assert plugins[name] in code + config, name
            continue
        module = {"paho-mqtt": "paho", "pytest-twisted": "pytest_twisted"}.get(
            name, name.replace("-", "_").lower())
        assert re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", code, re.M), name


def test_importing_every_mqttd_module_raises_no_deprecation_warning():
    """A fresh interpreter imports all of mqttd with DeprecationWarning as an error."""
    script = (
        "import importlib, pkgutil, mqttd\n"
        "for m in pkgutil.walk_packages(mqttd.__path__, 'mqttd.'):\n"
        "    importlib.import_module(m.name)\n"
        "import twisted.plugins.mqttd_plugin\n")
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning",
         "-W", "error::PendingDeprecationWarning", "-c", script],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
