"""What a check plugin implements and receives: the public check API.

A check type is any object with `name`, `negotiate`, `description`, `options` and an async
`check(request) -> CheckResult`. The engine enforces the deadline; a check must also close
everything it opened when it is cancelled.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from lbha.errors import PluginError
from lbha.model import ENGINE_CHECK_TYPES, CheckSpec, IPAddress

#: Seconds a check keeps back from the engine's deadline at most (see CheckRequest.own_budget).
OWN_VERDICT_MARGIN = 0.1
#: What a check writes where a secret (password, shared secret, an option declared
#: `secret=True`) would show: in a transcript line, a reason, a log message. Secrets are
#: replaced where they are written, never searched for in finished text.
REDACTED = "****"
#: Option value types a check schema may declare; "duration" takes "500ms" / "3s" / "2m".
OPTION_TYPES: frozenset[str] = frozenset({"str", "int", "float", "bool", "duration"})

#: The keys of a `[virtual.check]` table that only some check types read (CheckSpec fields);
#: `type`, `service`, `port`, the timing keys and `options` apply to every check. A check type
#: lists the ones it reads in `spec_keys` and the ones it cannot run without in
#: `required_spec_keys`; config check refuses a key the check does not read and a check that
#: lacks a required one. Both attributes are optional: without `spec_keys` every key is
#: accepted, as before they existed.
SPEC_KEYS: frozenset[str] = frozenset({
    "request", "receive", "regex", "virtualhost", "method", "login", "password", "database",
    "secret", "verify_tls", "ca_file", "command",
})


@dataclass(frozen=True)
class OptionSpec:
    """One option of a plugin check type, validated when the config is loaded."""

    type: str = "str"
    default: Any = None
    required: bool = False
    secret: bool = False
    help: str = ""
    #: Allowed values (checked at config load), e.g. ("auto", "dgram", "raw").
    choices: tuple[Any, ...] | None = None
    #: Inclusive bounds for int, float and duration options.
    minimum: float | None = None
    maximum: float | None = None
    #: Checks a value's syntax at config load (after its type): raises ValueError whose
    #: message config check shows against the option, e.g. for a list written as a string.
    validate: Callable[[Any], object] | None = None

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise PluginError(
                f"option type {self.type!r} is not one of {', '.join(sorted(OPTION_TYPES))}"
            )


@dataclass(frozen=True)
class Target:
    """The real server a check talks to, and the virtual service it is checked for.

    `rport` is the port to check, already resolved by the engine: the check's `port`, else
    the real server's port, else the virtual port, else the service's well-known port.
    """

    virtual: str
    vip: IPAddress | None
    vport: int | None
    protocol: str
    rip: IPAddress
    rport: int | None
    #: Firewall mark of a fwmark service (its VIP is then None).
    mark: int | None = None

    @cached_property
    def host(self) -> str:
        """The real server's address as text (cached: checks use it thousands of times)."""
        return str(self.rip)

    @property
    def family(self) -> int:
        """The socket address family to reach the real server with."""
        return socket.AF_INET6 if self.rip.version == 6 else socket.AF_INET

    @cached_property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if self.rip.version == 6 else self.host
        return host if self.rport is None else f"{host}:{self.rport}"


class Transcript:
    """The exchange of one check, for `lbha check -v`, written as the check gives it.

    A line that would carry a secret is given with REDACTED in its place by the check
    (`> PASS ****`); the transcript itself changes nothing.
    """

    def __init__(self, limit: int = 200) -> None:
        self._limit = limit
        self.lines: list[str] = []

    def _add(self, prefix: str, text: str) -> None:
        if len(self.lines) >= self._limit:
            return
        self.lines.append(f"{prefix} {text}")

    def sent(self, text: str) -> None:
        self._add(">", text)

    def received(self, text: str) -> None:
        self._add("<", text)

    def note(self, text: str) -> None:
        self._add("*", text)


@dataclass(frozen=True)
class CheckRequest:
    """Everything one check run needs."""

    target: Target
    spec: CheckSpec
    options: Mapping[str, Any]
    #: The deadline the engine enforces, for libraries that need their own socket timeout.
    timeout: float
    transcript: Transcript | None = None

    @property
    def own_budget(self) -> float:
        """The part of `timeout` a check spends before it gives up itself: 10 % of it, at
        most OWN_VERDICT_MARGIN, is kept back so the check's verdict, with a reason that
        says what was seen, arrives before the engine's bare timeout."""
        return max(self.timeout - min(OWN_VERDICT_MARGIN, self.timeout / 10), 0.001)


@dataclass(frozen=True)
class CheckResult:
    """A verdict with a reason an operator can read ("connect to 198.18.0.21:443 refused")."""

    up: bool
    reason: str

    @classmethod
    def success(cls, reason: str = "ok") -> CheckResult:
        return cls(True, reason)

    @classmethod
    def failure(cls, reason: str) -> CheckResult:
        return cls(False, reason)


@runtime_checkable
class CheckType(Protocol):
    """The contract of a check type."""

    #: Name used in configs: `type = NAME`, or `service = NAME` when `negotiate` is true.
    name: str
    #: True when this is a protocol of `type = "negotiate"` (selected by `service`).
    negotiate: bool
    description: str
    options: Mapping[str, OptionSpec]

    async def check(self, request: CheckRequest) -> CheckResult:
        """Judge one real server. May raise; the engine turns any exception into a failure."""
        ...


#: Optional: the SPEC_KEYS a check type reads, and those it needs (key -> what to set, shown in
#: the error), e.g. for a RADIUS check
#:
#:     spec_keys = frozenset({"login", "password", "secret"})
#:     required_spec_keys = MappingProxyType({"secret": "the RADIUS shared secret", ...})


def spec_keys_of(check: CheckType) -> frozenset[str]:
    """The SPEC_KEYS `check` reads (all of them when it does not say)."""
    return frozenset(getattr(check, "spec_keys", SPEC_KEYS))


def required_spec_keys_of(check: CheckType) -> Mapping[str, str]:
    """The SPEC_KEYS `check` cannot run without, each with what to set it to."""
    return getattr(check, "required_spec_keys", {})


def spec_keys_for(
    registry: CheckRegistry | None, name: str
) -> tuple[frozenset[str] | None, Mapping[str, str]]:
    """The SPEC_KEYS check `name` reads and those it needs; None for the keys read when the
    check is unknown (no plugins loaded, or none provides it), so nothing can be judged.
    The engine's own `on` / `off` and the `none` service read none."""
    if name in ENGINE_CHECK_TYPES or name == "none":
        return frozenset(), {}
    if registry is None or name not in registry:
        return None, {}
    check = registry.get(name)
    return spec_keys_of(check), required_spec_keys_of(check)


@runtime_checkable
class BatchCheckType(CheckType, Protocol):
    """Optional, for check types run thousands of times a second (the connect check).

    The engine hands such a check every request of its type due in the same scheduler tick
    (same deadline) in one call. It returns one result per request, in order, and keeps the
    deadline itself: within `own_budget` of the first request it answers "timeout after N s"
    for the unfinished ones, so the others keep their verdicts. At the deadline the engine
    cuts the whole batch off, as it does a single check.
    """

    async def check_batch(self, requests: Sequence[CheckRequest]) -> list[CheckResult]:
        """Judge every request; one result per request, in order."""
        ...


@dataclass(frozen=True)
class RegisteredCheck:
    check: CheckType
    plugin: str


@dataclass
class CheckRegistry:
    """Check types by name, as plugins registered them in `lbha_register_checks`."""

    _checks: dict[str, RegisteredCheck] = field(default_factory=dict)
    #: Set by the plugin manager while it calls one plugin's hook, for error messages.
    current_plugin: str = "<unknown>"

    def add(self, check: CheckType) -> None:
        """Register a check type; raises PluginError for a duplicate or malformed one."""
        if not isinstance(check, CheckType):
            raise PluginError(
                f"plugin {self.current_plugin!r} registered {check!r}, which lacks name, "
                "negotiate, description, options or check()"
            )
        name = check.name
        if not name or not isinstance(name, str):
            raise PluginError(f"plugin {self.current_plugin!r} registered a check without a name")
        if name in self._checks:
            raise PluginError(
                f"check type {name!r} from plugin {self.current_plugin!r} is already provided "
                f"by plugin {self._checks[name].plugin!r}"
            )
        for option, spec in check.options.items():
            if not isinstance(spec, OptionSpec):
                raise PluginError(
                    f"check type {name!r}: option {option!r} must be an lbha.checkapi.OptionSpec"
                )
            if spec.validate is not None and spec.default is not None:
                try:
                    spec.validate(spec.default)
                except ValueError as exc:
                    raise PluginError(f"check type {name!r}: the default of option {option!r} "
                                      f"is not valid: {exc}") from None
        keys, required = spec_keys_of(check), required_spec_keys_of(check)
        if not keys <= SPEC_KEYS or not required.keys() <= keys:
            raise PluginError(
                f"check type {name!r}: spec_keys must be a subset of {', '.join(sorted(SPEC_KEYS))}"
                " and include every key of required_spec_keys"
            )
        self._checks[name] = RegisteredCheck(check, self.current_plugin)

    def remove_plugin(self, plugin: str) -> None:
        """Forget every check type a plugin registered (it failed half-way)."""
        for name in [n for n, reg in self._checks.items() if reg.plugin == plugin]:
            del self._checks[name]

    def get(self, name: str) -> CheckType:
        return self._checks[name].check

    def plugin_of(self, name: str) -> str:
        return self._checks[name].plugin

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._checks))

    def __len__(self) -> int:
        return len(self._checks)

    def negotiate_names(self) -> frozenset[str]:
        return frozenset(n for n, reg in self._checks.items() if reg.check.negotiate)
