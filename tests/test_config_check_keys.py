"""Check keys a check type ignores, or needs and lacks, are config errors naming the key.

What each check type reads is declared by its plugin (`spec_keys`, `required_spec_keys` in
lbha.checkapi); these tests run with the installed plugins, as `lbha config check` does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cli_process import LBHA

from lbha.checkapi import SPEC_KEYS, CheckRegistry, CheckRequest, CheckResult, spec_keys_for
from lbha.config import load_config_text
from lbha.config_show import render_config
from lbha.errors import ConfigError, PluginError
from lbha.plugin_manager import PluginManager


@pytest.fixture(scope="module")
def registry() -> CheckRegistry:
    manager = PluginManager()
    manager.load_entry_points()
    manager.register_checks()
    return manager.checks


def service(check: str, real_check: str = "", port: int = 80) -> str:
    text = f'[[virtual]]\naddress = "198.18.0.100"\nports = {port}\n[virtual.check]\n{check}\n' \
        '[[virtual.real]]\naddress = "198.18.0.21"\n'
    return text + (f"[virtual.real.check]\n{real_check}\n" if real_check else "")


def problems(text: str, registry: CheckRegistry) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "lbha.toml", checks=registry)
    return [str(p) for p in info.value.problems]


IGNORED = [
    ('service = "smtp"', "receive", '"250"'),
    ('service = "submission"', "request", '"x"'),
    ('service = "imap"', "receive", '"OK"'),
    ('service = "pop"', "request", '"x"'),
    ('service = "nntp"', "receive", '"200"'),
    ('service = "nntp"', "verify_tls", "true"),
    ('service = "sip"', "receive", '"200"'),
    ('service = "sip"', "password", '"pw"'),
    ('service = "http"', "login", '"u"'),
    ('service = "http"', "secret", '"s"'),
    ('service = "http"', "database", '"db"'),
    ('service = "http"', "verify_tls", "true"),
    ('service = "https"', "command", '"/bin/true"'),
    ('service = "ftp"', "virtualhost", '"ftp.example"'),
    ('service = "mysql"\nlogin = "u"', "receive", '"1"'),
    ('service = "radius"\nlogin = "u"\nsecret = "s"', "request", '"x"'),
    ('service = "dns"\nrequest = "example.org"', "login", '"u"'),
    ('type = "connect"', "password", '"pw"'),
    ('type = "ping"', "receive", '"x"'),
    ('type = "external"\ncommand = "/bin/true"', "request", '"x"'),
    ('type = "on"', "request", '"/"'),
    ('type = "off"', "method", '"HEAD"'),
    ('service = "none"', "receive", '"x"'),
]


@pytest.mark.parametrize(("check", "key", "value"), IGNORED,
                         ids=[f"{c.splitlines()[0]}-{k}" for c, k, _ in IGNORED])
def test_a_key_the_check_ignores_is_an_error_naming_it(
    registry: CheckRegistry, check: str, key: str, value: str
) -> None:
    found = problems(service(f"{check}\n{key} = {value}"), registry)
    assert len(found) == 1, found
    assert f"virtual[0].check.{key}: the " in found[0]
    assert f"check does not use {key!r}" in found[0]


@pytest.mark.parametrize(
    ("check", "expected"),
    [('service = "mysql"', "the mysql check needs 'login' (the MySQL user"),
     ('service = "radius"\nlogin = "u"', "the radius check needs 'secret'"),
     ('service = "radius"\nsecret = "s"', "the radius check needs 'login'"),
     ('type = "external"', "the external check needs 'command' (the program to run)"),
     ('service = "dns"', "the dns check needs 'request'")],
)
def test_a_check_that_can_never_pass_is_refused(
    registry: CheckRegistry, check: str, expected: str
) -> None:
    found = problems(service(check), registry)
    assert any(f"virtual[0].check: {expected}" in p and "can never pass" in p for p in found), \
        found


def test_radius_without_secret_and_login_names_both(registry: CheckRegistry) -> None:
    found = problems(service('service = "radius"'), registry)
    assert sorted(p.split("needs ")[1][:8] for p in found) == ["'login' ", "'secret'"]


def test_a_required_key_set_on_every_real_server_is_enough(registry: CheckRegistry) -> None:
    text = service('service = "dns"', 'request = "a.example"')
    (virtual,) = load_config_text(text, checks=registry).virtuals
    assert virtual.reals[0].check.request == "a.example"
    # ... but not when one real server is left without it.
    two = text + '[[virtual.real]]\naddress = "198.18.0.22"\n'
    assert any("needs 'request'" in p for p in problems(two, registry))


def test_a_real_server_override_the_check_ignores_is_refused(registry: CheckRegistry) -> None:
    found = problems(service('service = "smtp"', 'receive = "250"'), registry)
    assert len(found) == 1
    assert "virtual[0].real[0].check.receive: the smtp check does not use 'receive'" in found[0]


def test_keys_the_check_reads_are_accepted(registry: CheckRegistry) -> None:
    good = [
        'service = "http"\nrequest = "/health"\nreceive = "OK"\nregex = false\nmethod = "HEAD"\n'
        'virtualhost = "www.example"',
        'service = "https"\nverify_tls = true\nvirtualhost = "www.example"',
        'service = "imap"\nlogin = "u"\npassword = "p"\noptions = { starttls = true }\n'
        'verify_tls = true',
        'service = "mysql"\nlogin = "u"\npassword = "p"\ndatabase = "d"\nrequest = "SELECT 1"',
        'service = "radius"\nlogin = "u"\npassword = "p"\nsecret = "s"',
        'service = "ftp"\nlogin = "u"\npassword = "p"\nrequest = "f"\nreceive = "x"',
        'service = "sip"\nlogin = "probe@example.org"',
        'type = "external"\ncommand = ["/bin/true", "-x"]',
    ]
    for check in good:
        load_config_text(service(check), checks=registry)


def test_virtualhost_is_accepted_for_http_feedback(registry: CheckRegistry) -> None:
    text = service('type = "connect"\nvirtualhost = "agent.example"')
    assert any("does not use 'virtualhost'" in p for p in problems(text, registry))
    load_config_text(text + '[virtual.feedback]\ntype = "http"\n', checks=registry)


def test_without_plugins_nothing_is_judged_but_engine_types() -> None:
    load_config_text(service('service = "smtp"\nreceive = "250"'))
    with pytest.raises(ConfigError, match="the on check does not use 'receive'"):
        load_config_text(service('type = "on"\nreceive = "x"'))


def test_every_builtin_check_declares_its_keys(registry: CheckRegistry) -> None:
    builtins = [registry.get(n) for n in registry
                if type(registry.get(n)).__module__.startswith("lbha.checks.")]
    assert len(builtins) >= 20
    for check in builtins:
        assert isinstance(getattr(check, "spec_keys", None), frozenset), check.name
        assert check.spec_keys <= SPEC_KEYS, check.name  # type: ignore[attr-defined]


def test_show_writes_only_the_keys_the_check_reads(registry: CheckRegistry) -> None:
    config = load_config_text(service('service = "smtp"'), checks=registry)
    shown = render_config(config, registry)
    again = load_config_text(shown, checks=registry)
    assert again.virtuals == config.virtuals
    assert "method" not in shown
    assert "regex" not in shown
    assert spec_keys_for(registry, "smtp")[0] == {"verify_tls", "ca_file", "virtualhost"}


class _Check:
    name = "probe"
    negotiate = False
    description = "test"
    options: MappingProxyType[str, Any] = MappingProxyType({})

    def __init__(self, keys: frozenset[str], required: dict[str, str]) -> None:
        self.spec_keys = keys
        self.required_spec_keys = required

    async def check(self, request: CheckRequest) -> CheckResult:
        return CheckResult.success()


@pytest.mark.parametrize(
    ("keys", "required"),
    [(frozenset({"colour"}), {}), (frozenset({"login"}), {"secret": "x"})],
)
def test_a_plugin_declaring_unknown_keys_is_refused(keys: frozenset[str],
                                                    required: dict[str, str]) -> None:
    with pytest.raises(PluginError, match="spec_keys must be a subset"):
        CheckRegistry().add(_Check(keys, required))


def test_config_check_cli_names_the_ignored_key(tmp_path: Path) -> None:
    path = tmp_path / "lbha.toml"
    path.write_text(service('service = "smtp"\nreceive = "250 OK"', port=25))
    out = subprocess.run([*LBHA, "config", "check", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert f"{path}:6: virtual[0].check.receive: the smtp check does not use 'receive'" \
        in out.stderr


def test_a_service_with_a_type_other_than_negotiate_is_refused(registry: CheckRegistry) -> None:
    found = problems(service('type = "connect"\nservice = "http"'), registry)
    assert found == ["lbha.toml:6: virtual[0].check.service: does nothing: type is 'connect', "
                     "not \"negotiate\"; remove it or set type = \"negotiate\""]


def test_a_key_file_with_auth_none_is_refused() -> None:
    text = '[cluster]\nnode = "a"\nrole = "master"\nauth = "none"\nauth_key_file = "/k"\n' \
        '[[cluster.peers]]\nname = "b"\naddresses = ["198.18.0.2"]\n'
    with pytest.raises(ConfigError, match=r"cluster\.auth_key_file: does nothing with auth"):
        load_config_text(text)
