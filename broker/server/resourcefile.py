"""BROKER_RESOURCES_FILE: the resource policy read from YAML or JSON (validated in broker.core.resources, with one
message naming every problem), and re-read when the file changes, as the TLS files are."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.core.resources import ResourcePolicy, parse_policy
from broker.errors import ConfigError

log = logging.getLogger("broker.resources")


def load_policy(path: Path, allowed_callers: frozenset[str]) -> ResourcePolicy:
    """The policy in `path`: JSON when the file is JSON, else YAML (a superset)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"BROKER_RESOURCES_FILE: cannot read {path}: {exc.strerror}") from None
    document: Any
    try:
        document = json.loads(text)
    except ValueError:
        import yaml  # only for a YAML file

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"BROKER_RESOURCES_FILE: {path} is neither JSON nor YAML{line}") from None
    return parse_policy(document, allowed_callers=allowed_callers, source=f"BROKER_RESOURCES_FILE ({path})")


class ReloadingPolicy:
    """The policy in force, re-read when the file changes (a ConfigMap update, an edit): looked at, at most once per
    `check_every` seconds, by the request that needs it. At start-up a bad file stops the broker; later, a file that
    does not validate (or is half-written) is logged at ERROR and the policy in force stays."""

    def __init__(
        self,
        path: Path,
        allowed_callers: frozenset[str],
        *,
        check_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._allowed = allowed_callers
        self._every = check_every
        self._clock = clock
        self._stamp = _stamp(path)
        self._policy = load_policy(path, allowed_callers)
        self._checked = clock()

    def current(self) -> ResourcePolicy:
        now = self._clock()
        if now - self._checked < self._every:
            return self._policy
        self._checked = now
        try:
            stamp = _stamp(self._path)
        except OSError as exc:
            log.warning("resource policy file unreadable, keeping the policy in force: %s", exc.strerror)
            return self._policy
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy = load_policy(self._path, self._allowed)
            except ConfigError as exc:
                log.error("resource policy not reloaded, keeping the policy in force: %s", exc)
            else:
                log.info("resource policy reloaded", extra={"resources": len(self._policy)})
        return self._policy


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()  # follows the symlink a ConfigMap volume swaps on update
    return (st.st_mtime_ns, st.st_size, st.st_ino)
