"""``deploy/kubernetes/``: valid objects, and bound to pypool's config and endpoints.

Offline: each manifest is read into the Kubernetes Python client's model for
its kind and written back; a key the API does not know (a typo) or a value of
the wrong shape does not survive the round trip. Then the parts that must
agree are checked against each other and against pypool itself: the ports of
the config, the probe paths pypool serves, the drain against the grace
period, the Secret's keys against the config's ``${NAME}`` references, and
the autoscaler's maximum against the servers' max_connections.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient

from pypool import capacity
from pypool.config import parse_config
from pypool.httpd import PROBE_PATHS

DIRECTORY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}


def manifests() -> dict[str, dict]:
    """The objects kustomization.yaml lists, by kind."""
    kustomization = yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DIRECTORY / name).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


OBJECTS = manifests()


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in DIRECTORY.glob("*.yaml")} - {"kustomization.yaml"}
    assert {kind for _, kind in MODELS} == set(OBJECTS)


@pytest.mark.parametrize("kind", sorted(OBJECTS))
def test_manifest_is_a_valid_object_of_its_kind(kind: str) -> None:
    doc = OBJECTS[kind]
    model_name = MODELS[(doc["apiVersion"], kind)]
    api = ApiClient()
    model = read_model(api, doc, model_name)
    assert type(model).__name__ == model_name
    # Whatever the model did not understand is missing here.
    assert api.sanitize_for_serialization(model) == doc


def read_model(api: ApiClient, doc: dict, model_name: str):  # type: ignore[no-untyped-def]
    """The client's own deserializer: recent clients take the response's text, older ones an object."""
    if "response_text" in inspect.signature(api.deserialize).parameters:
        return api.deserialize(json.dumps(doc), model_name, "application/json")
    return api.deserialize(types.SimpleNamespace(data=json.dumps(doc)), model_name)


def container() -> dict:
    return OBJECTS["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def secret_env() -> dict[str, str]:
    """The container's environment as the Secret fills it."""
    secret = OBJECTS["Secret"]
    env = {}
    for var in container()["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        env[var["name"]] = secret["stringData"][ref["key"]]
    return env


def pypool_config():
    configmap = OBJECTS["ConfigMap"]
    (filename, text), = configmap["data"].items()
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "config")
    path = f"{mount['mountPath']}/{filename}"
    assert container()["args"] == [path]  # pypool is started on the mounted file
    return parse_config(text, path, environ=secret_env())


def test_the_config_parses_with_the_secrets_environment_and_nothing_else() -> None:
    config = pypool_config()
    assert config.warnings == ()
    assert config.general.autoreload is not None  # ConfigMap edits reach the pods
    assert config.general.enable_prometheus_exporter
    with pytest.raises(Exception, match="environment variable .* is not set"):
        parse_config(next(iter(OBJECTS["ConfigMap"]["data"].values())), "pgcat.toml", environ={})


def test_ports_and_probes_match_what_pypool_listens_on() -> None:
    general = pypool_config().general
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"postgres": general.port, "metrics": general.prometheus_exporter_port}
    assert general.host == "0.0.0.0"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        http = container()[probe]["httpGet"]
        assert http["path"] == path and path in PROBE_PATHS
        assert http["port"] == "metrics"
    annotations = OBJECTS["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == general.prometheus_exporter_port
    assert annotations["prometheus.io/path"] == "/metrics"
    service_ports = {p["name"]: p["targetPort"] for p in OBJECTS["Service"]["spec"]["ports"]}
    assert service_ports == {"postgres": "postgres", "metrics": "metrics"}


def test_the_drain_ends_before_the_kubelet_kills() -> None:
    pod = OBJECTS["Deployment"]["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    shutdown = pypool_config().general.shutdown_timeout / 1000
    # The grace period runs from the start of preStop: the sleep, then SIGTERM's drain.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown
    # The sleep lets endpoints update: longer than a few readiness periods.
    assert pre_stop >= 2 * container()["readinessProbe"]["periodSeconds"]


def test_every_object_selects_the_pods() -> None:
    labels = OBJECTS["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [OBJECTS["Deployment"]["spec"]["selector"]["matchLabels"], OBJECTS["Service"]["spec"]["selector"],
                 OBJECTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= labels.items()
    target = OBJECTS["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", OBJECTS["Deployment"]["metadata"]["name"])


def test_replicas_budget_and_server_connections_fit() -> None:
    hpa = OBJECTS["HorizontalPodAutoscaler"]["spec"]
    budget = OBJECTS["PodDisruptionBudget"]["spec"]["minAvailable"]
    assert hpa["minReplicas"] == OBJECTS["Deployment"]["spec"]["replicas"]
    assert hpa["minReplicas"] > budget  # a node drain can always move one pod
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in container()["resources"]["requests"]  # utilisation is a percentage of the request
    max_connections = int(OBJECTS["ConfigMap"]["metadata"]["annotations"]["pypool.io/postgres-max-connections"])
    assert capacity.instance_warnings(pypool_config(), hpa["maxReplicas"], max_connections) == []
    # The sizing comment in configmap.yaml says the same.
    per_server = capacity.connections_per_server(pypool_config(), hpa["maxReplicas"])
    comment = (DIRECTORY / "configmap.yaml").read_text()
    assert re.search(rf"= {max(per_server.values())} < max_connections \({max_connections}\)", comment)


def test_the_pod_runs_the_image_as_docker_dockerfile_builds_it() -> None:
    dockerfile = (DIRECTORY.parents[1] / "docker" / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile).group(1)
    pod = OBJECTS["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    assert {p["containerPort"] for p in container()["ports"]} == exposed
    assert re.search(r'^ENTRYPOINT \["pypool"\]$', dockerfile, re.M)  # args are pypool's: the config path
