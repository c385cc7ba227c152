"""The chart's link-event settings: the webhook URL and its secret from an existing Secret (mounted as a file), the
watchers also admitted by the mesh policies, the retention, the schema, and the backlog alert at 15 minutes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from broker.config import Settings
from tests.support import helm


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d and d.get("kind") == kind]


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [c for c in by_kind(docs, "ConfigMap") if "BROKER_LISTEN" in c.get("data", {})]
    return dict(cm["data"])


def test_the_webhook_and_watchers_reach_the_broker_as_settings_it_accepts() -> None:
    docs = helm.render(helm.ALL_FEATURES)
    env = config(docs)
    assert env["BROKER_WEBHOOK_URL"] == "https://hooks.example.com/token-broker"
    assert env["BROKER_WEBHOOK_SECRET_FILE"] == "/etc/token-broker/webhook/webhook-secret"
    assert env["BROKER_EVENT_RETENTION"] == "3d"
    assert env["BROKER_EVENT_WATCHERS"] == "spiffe://cluster.local/ns/ops/sa/notifier,token:notifier"
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook"]
    assert volume["secret"]["secretName"] == "token-broker-webhook"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["webhook"] == "/etc/token-broker/webhook"
    # What the chart renders, the broker parses (the secret file stands for the mounted one).
    env = {k: v for k, v in env.items() if k.startswith(("BROKER_EVENT_", "BROKER_WEBHOOK_")) and "_FILE" not in k}
    env["BROKER_WEBHOOK_SECRET"] = "whsec_" + "a" * 32
    settings = Settings.from_env(env)
    assert settings.events.retention == 3 * 86400
    assert settings.events.watchers == frozenset({"uri:spiffe://cluster.local/ns/ops/sa/notifier", "token:notifier"})


def test_no_webhook_by_default_and_a_url_needs_a_secret() -> None:
    env = config(helm.render())
    assert "BROKER_WEBHOOK_URL" not in env
    assert env["BROKER_EVENT_WATCHERS"] == ""
    r = helm.helm(
        "template", "tb", str(helm.CHART), "--set", "events.webhook.url=https://hooks.example.com/x", check=False
    )
    assert r.returncode != 0
    assert "events.webhook.secret.existingSecret is required" in r.stderr


@pytest.mark.parametrize(
    "bad", ["events.webhook.url=ftp://x", "events.webhook.retryPeriod=3600", "events.retention=a-week"]
)
def test_the_schema_refuses_bad_event_values(bad: str) -> None:
    r = helm.helm("template", "tb", str(helm.CHART), "--set", bad, check=False)
    assert r.returncode != 0


def test_the_mesh_policies_admit_the_watchers_too() -> None:
    watchers = (
        "spiffe://cluster.local/ns/ops/sa/notifier,dns:notifier.ops.serviceaccount.identity.linkerd.cluster.local"
    )
    docs = helm.render(helm.MESH, sets=(f"events.watchers={{{watchers}}}",))
    (ap,) = [d for d in by_kind(docs, "AuthorizationPolicy") if d["apiVersion"].startswith("security.istio.io")]
    assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/chat/sa/chat-worker",
        "cluster.local/ns/ops/sa/notifier",
    ]
    (mtls,) = by_kind(docs, "MeshTLSAuthentication")
    assert "notifier.ops.serviceaccount.identity.linkerd.cluster.local" in mtls["spec"]["identities"]
    assert helm.validate_istio(docs) == 2


def test_the_backlog_alert_fires_after_15_minutes() -> None:
    rules = yaml.safe_load((helm.CHART / "files" / "alerts.yaml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "TokenBrokerWebhookBacklog"]
    assert rule["expr"] == "max by (namespace, job) (token_broker_webhook_oldest_undelivered_seconds) > 900"
