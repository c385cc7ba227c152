"""BROKER_RESOURCES_FILE: the resource policy read from YAML or JSON at start-up (validated in broker.core.resources,
with one message naming every problem)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.core.resources import ResourcePolicy, parse_policy
from broker.errors import ConfigError


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
