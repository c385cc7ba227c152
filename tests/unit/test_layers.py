"""The tree is the map: the domain imports no adapter library, and the composition root wires packages only
through their public APIs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

BROKER = Path(__file__).resolve().parents[2] / "broker"
ADAPTER_LIBRARIES = ("grpc", "asyncpg", "httpx2", "httpx", "authlib", "cryptography", "prometheus_client")


def test_importing_the_domain_loads_no_adapter_library() -> None:
    code = f"import sys, broker.core; print(','.join(m for m in {ADAPTER_LIBRARIES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_domain_imports_no_adapter_package_of_the_broker() -> None:
    outward = (
        "broker.server",
        "broker.postgres",
        "broker.workers",
        "broker.events",
        "broker.config",
        "broker.app",
        "broker.idp",
        "broker.protected_resource",
    )
    for path in (BROKER / "core").rglob("*.py"):
        wrong = {m for m in _imports(path) if m.startswith(outward) or m.split(".")[0] in ADAPTER_LIBRARIES}
        assert not wrong, f"{path.relative_to(BROKER)} imports {sorted(wrong)}"


def test_the_composition_root_reaches_into_no_refresh_module() -> None:
    deep = {m for m in _imports(BROKER / "app.py") if m.startswith("broker.core.refresh")}
    assert not deep
