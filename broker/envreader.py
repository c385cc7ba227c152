"""Reading one environment mapping into typed values, collecting every problem before failing once."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from broker.identities import parse_allowed
from broker.model import Secret

T = TypeVar("T")


class EnvReader:
    """Parses each variable, collecting every problem before failing once."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.env = environ
        self.errors: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value if value not in (None, "") else None

    def get(self, name: str, parse: Callable[[str], T], default: T, check: Callable[[T], str | None]) -> T:
        text = self.raw(name)
        if text is None:
            return default
        try:
            value = parse(text.strip())
        except ValueError:
            self.errors.append(f"{name}: cannot parse {text!r}")
            return default
        problem = check(value)
        if problem:
            self.errors.append(f"{name}: {problem}")
        return value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        def check(v: float) -> str | None:
            if v != v or v in (float("inf"), float("-inf")):
                return "must be a finite number of seconds"
            if v < 0 or (v == 0 and not allow_zero):
                return "must be " + ("zero or more" if allow_zero else "more than zero") + " seconds"
            return None

        return self.get(name, float, default, check)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self.get(name, int, default, lambda v: None if low <= v <= high else f"must be {low}..{high}")

    def boolean(self, name: str, default: bool) -> bool:
        text = self.raw(name)
        if text is None:
            return default
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        self.errors.append(f"{name}: must be true or false, not {text!r}")
        return default

    def secret(self, name: str) -> Secret | None:
        """NAME, or the contents of the file NAME_FILE (trailing newline stripped); never both."""
        direct, path = self.raw(name), self.raw(name + "_FILE")
        if direct and path:
            self.errors.append(f"{name} and {name}_FILE are both set; set one")
            return None
        if path:
            try:
                return Secret(Path(path).read_text().strip())
            except OSError as exc:
                self.errors.append(f"{name}_FILE: cannot read {path}: {exc.strerror}")
                return None
        return Secret(direct) if direct else None

    def callers(self, name: str) -> frozenset[str]:
        allowed: set[str] = set()
        for entry in (e.strip() for e in (self.raw(name) or "").split(",")):
            if not entry:
                continue
            try:
                allowed.add(parse_allowed(entry))
            except ValueError as exc:
                self.errors.append(f"{name}: {exc}")
        return frozenset(allowed)

    def file(self, name: str) -> Path | None:
        text = self.raw(name)
        if text is None:
            return None
        p = Path(text)
        if not p.is_file():
            self.errors.append(f"{name}: no such file {text}")
        return p

    def address(self, name: str, default: str, *, allow_empty: bool = False) -> str:
        text = self.env.get(name)
        if text is None or (text == "" and not allow_empty):
            return default
        if text == "" and allow_empty:
            return ""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            self.errors.append(f"{name}: must be host:port, not {text!r}")
            return default
        host = host.strip("[]")
        wildcard = ("localhost", "0.0.0.0", "::", "*")  # noqa: S104 - validating an address, not binding
        if host not in wildcard and not is_ip_or_name(host):
            self.errors.append(f"{name}: bad host {host!r}")
        return text


def is_ip_or_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(part.replace("-", "").isalnum() for part in host.split(".")) and len(host) <= 253
