"""Secrets are replaced where they are written: config errors and config show.

Checks write their own placeholders (tests/checks: ftp, mail, ldap, mysql, radius), and a
daemon running failing checks is read in tests/checks/test_radius.py.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest

from lbha.checkapi import CheckRegistry, CheckRequest, CheckResult, OptionSpec
from lbha.config import load_config_text
from lbha.config_show import render_config
from lbha.errors import ConfigError


class Vault:
    name = "vault"
    negotiate = False
    description = "a check with a secret option"
    options = MappingProxyType({"token": OptionSpec(type="str", secret=True),
                                "retries": OptionSpec(type="int", default=1)})

    async def check(self, request: CheckRequest) -> CheckResult:
        return CheckResult.success()


def _registry() -> CheckRegistry:
    registry = CheckRegistry()
    registry.add(Vault())
    return registry


SERVICE = """\
[[virtual]]
name = "web"
address = "198.18.0.100"
ports = 80
[virtual.check]
{check}
[[virtual.real]]
address = "198.18.0.21"
"""


@pytest.mark.parametrize(("check", "alerts", "value", "key"), [
    ("password = 48151623", "", "48151623", "virtual[0].check.password"),
    ('type = "negotiate"\nservice = "radius"\nsecret = 90210', "", "90210",
     "virtual[0].check.secret"),
    ("", "[alerts.email]\npassword = 271828", "271828", "alerts.email.password"),
    ("", '[alerts.snmp]\ncommunity = ["c0mmun1ty"]', "c0mmun1ty", "alerts.snmp.community"),
    ('type = "vault"\noptions = { token = 31337 }', "", "31337",
     "virtual[0].check.options.token"),
], ids=["password", "secret", "email-password", "snmp-community", "plugin-secret-option"])
def test_a_mistyped_secret_is_not_quoted_by_config_errors(check: str, alerts: str, value: str,
                                                          key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config_text(SERVICE.format(check=check) + alerts, checks=_registry())
    message = str(error.value)
    assert key in message
    assert "got an integer" in message or "got an array" in message
    assert value not in message


def test_a_mistyped_ordinary_value_is_still_quoted() -> None:
    with pytest.raises(ConfigError) as error:
        load_config_text(SERVICE.format(check='type = "vault"\noptions = { retries = "x" }'),
                         checks=_registry())
    assert "'x'" in str(error.value)


@pytest.mark.parametrize("password", ["e", "check", "vault-token-1"])
def test_config_show_replaces_secret_values_and_nothing_else(password: str) -> None:
    text = SERVICE.format(check=f'type = "vault"\noptions = {{ token = "{password}" }}\n'
                                f'login = "lbha"\npassword = "{password}"')
    config = load_config_text(text + f'[alerts.email]\npassword = "{password}"\n'
                              f'[alerts.snmp]\ncommunity = "{password}"', checks=_registry())
    shown = render_config(config, _registry())
    assert 'name = "web"' in shown
    assert 'type = "vault"' in shown
    assert 'login = "lbha"' in shown
    assert shown.count('password = "****"') == 2
    assert 'community = "****"' in shown
    assert 'token = "****"' in shown
    assert f'"{password}"' not in shown
