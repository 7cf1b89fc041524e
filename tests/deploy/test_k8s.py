"""The Kubernetes base (deploy/k8s/): rendered, validated against the API schemas, and checked for sense.

Rendered with `kubectl kustomize` when kubectl is installed; otherwise with the small renderer below,
which does what this kustomization uses (resources, configMapGenerator, labels, images), so the checks
still run. When kubectl is there, a test keeps the two renderings equal.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from deploy.nginx.render import K8S, K8S_CONF, render
from services.auth.adapters.signing import generate_pem
from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings, load_auth_settings
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import describe, load_settings
from shared.outbox import LEASE_MARGIN
from tests.perf import capacity

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
SECRET = "referral-system"
REQUIRED_SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "AUTH_JWT_PRIVATE_KEYS", "AUTH_SMTP_URL"}
SERVICES = {"auth": 8081, "referral": 8082}
WORKLOADS = ("Deployment", "Job")
Object = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------------


def render_with_kubectl(kubectl: str) -> list[Object]:
    result = subprocess.run(
        [kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"`kubectl kustomize {BASE.relative_to(ROOT)}` failed:\n{result.stderr}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def render_without_kubectl() -> list[Object]:
    """The base as kustomize renders it, minus the content hash in generated names (not needed here)."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "labels", "resources", "configMapGenerator", "images"}
    unknown = set(kustomization) - known
    if unknown:
        pytest.fail(
            f"kustomization.yaml uses {sorted(unknown)}, which the fallback renderer in {__file__} does not"
            " know: teach it, or install kubectl"
        )
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = BASE / resource
        if not path.is_file():
            pytest.fail(f"the fallback renderer reads files only; {resource} is not one")
        objects += [document for document in yaml.safe_load_all(path.read_text()) if document]
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=")
            data[key or Path(source).name] = (BASE / source).read_text()
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    for label_set in kustomization.get("labels", []):
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])
            template = obj.get("spec", {}).get("template")
            if label_set.get("includeTemplates") and obj["kind"] in WORKLOADS and template:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
            if label_set.get("includeSelectors"):
                pytest.fail("the fallback renderer does not add labels to selectors")
    for image in kustomization.get("images", []):
        for container in containers_of_all(objects):
            name, _, _ = container["image"].partition(":")
            if name == image["name"]:
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{image['newTag']}" if "newTag" in image else new_name
    return objects


def containers_of_all(objects: list[Object]) -> Iterator[Object]:
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield from pod_spec(obj).get("containers", [])
            yield from pod_spec(obj).get("initContainers", [])


@pytest.fixture(scope="module")
def rendered() -> list[Object]:
    kubectl = shutil.which("kubectl")
    return render_with_kubectl(kubectl) if kubectl else render_without_kubectl()


@pytest.fixture(scope="module")
def generated_names() -> set[str]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return {generator["name"] for generator in kustomization.get("configMapGenerator", [])}


def unhashed(name: str, generated: set[str]) -> str:
    """`auth-config-6g9tf7m2m8` -> `auth-config`: kustomize's content-hash suffix dropped."""
    base, _, suffix = name.rpartition("-")
    return base if base in generated and re.fullmatch(r"[a-z0-9]{10}", suffix) else name


# --- lookups --------------------------------------------------------------------------------------


def objects_of(rendered: list[Object], kind: str) -> dict[str, Object]:
    return {obj["metadata"]["name"]: obj for obj in rendered if obj["kind"] == kind}


def one(rendered: list[Object], kind: str, name: str) -> Object:
    found = objects_of(rendered, kind).get(name)
    if found is None:
        pytest.fail(f"the base renders no {kind} {name!r}")
    return found


def pod_spec(obj: Object) -> Object:
    spec: Object = obj["spec"]["template"]["spec"]
    return spec


def container(obj: Object, name: str | None = None) -> Object:
    containers = pod_spec(obj)["containers"]
    if name is None:
        assert len(containers) == 1, f"{obj['metadata']['name']}: expected one container"
        first: Object = containers[0]
        return first
    found: Object = next(c for c in containers if c["name"] == name)
    return found


def config_map_named(rendered: list[Object], reference: str) -> Object:
    config_map = objects_of(rendered, "ConfigMap").get(reference)
    if config_map is None:
        pytest.fail(f"ConfigMap {reference!r} is referenced but not rendered")
    return config_map


def secret_refs(obj: Object) -> Iterator[tuple[str, str | None]]:
    """(secret name, key or None for a whole-Secret reference) of every reference in a workload."""
    spec = pod_spec(obj)
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                yield source["secretRef"]["name"], None
        for variable in c.get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"]
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            yield volume["secret"]["secretName"], None


def environment(rendered: list[Object], obj: Object, secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, with `secret` as the Secret's data."""
    env: dict[str, str] = {}
    c = container(obj)
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map_named(rendered, source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(secret)
    for variable in c.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif ref := variable.get("valueFrom", {}).get("secretKeyRef"):
            env[variable["name"]] = secret[ref["key"]]
        elif ref := variable.get("valueFrom", {}).get("configMapKeyRef"):
            env[variable["name"]] = config_map_named(rendered, ref["name"])["data"][ref["key"]]
    return env


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def template_labels(obj: Object) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


EXAMPLE_SECRET = {
    "AUTH_SMTP_URL": "smtps://mailer:pw@mail.example.internal:465",
    "DATABASE_URL": "postgresql://referral:pw@db.example.internal:5432/referral",
    "REDIS_URL": "redis://cache.example.internal:6379/0",
    "AUTH_HUNTER_API_KEY": "hunter-key",
}


def pre_stop_pause(c: Object) -> int:
    """Seconds the container's preStop hook waits (`sleep N`)."""
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


def readme_secret_command() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        rf"kubectl[^\n]*create secret generic {SECRET}\b(?:[^\n]*\\\n)*[^\n]*(?:\n\s*#[^\n]*)*", readme
    )
    if not match:
        pytest.fail(f"README.md must show `kubectl create secret generic {SECRET} ...`")
    return match.group(0)


# --- tests ----------------------------------------------------------------------------------------


def test_renders_and_validates_strictly(rendered: list[Object]) -> None:
    version = kubernetes_validate.latest_version()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (1, 30)
    problems = []
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {error.message}")
    assert not problems, "\n".join(problems)


def test_the_objects_are_all_there(rendered: list[Object]) -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered}
    expected = {
        ("Deployment", "auth"),
        ("Deployment", "referral"),
        ("Deployment", "gateway"),
        ("Service", "auth"),
        ("Service", "referral"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "auth"),
        ("HorizontalPodAutoscaler", "referral"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("Job", "auth-migrate"),
        ("Job", "referral-migrate"),
        ("Ingress", "gateway"),
        ("PodDisruptionBudget", "auth"),
        ("PodDisruptionBudget", "referral"),
        ("PodDisruptionBudget", "gateway"),
        ("NetworkPolicy", "auth"),
        ("NetworkPolicy", "referral"),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    assert not [obj for obj in rendered if obj["kind"] == "Namespace"], "the namespace is the overlay's"
    assert all("namespace" not in obj["metadata"] for obj in rendered), "the namespace is the overlay's"


def test_fallback_renderer_agrees_with_kubectl(rendered: list[Object], generated_names: set[str]) -> None:
    """Where kubectl renders the base, the fallback must render the same (content hashes aside)."""

    def normalized(objects: list[Object]) -> dict[tuple[str, str], Object]:
        text = yaml.safe_dump(objects)
        for name in generated_names:
            text = re.sub(rf"\b{re.escape(name)}-[a-z0-9]{{10}}\b", name, text)
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in yaml.safe_load(text)}

    assert normalized(render_without_kubectl()) == normalized(copy.deepcopy(rendered))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_deployment(rendered: list[Object], name: str) -> None:
    deployment = one(rendered, "Deployment", name)
    assert deployment["spec"]["replicas"] == 2
    c = container(deployment)
    assert c["command"] == ["python", "-m", f"services.{name}", "serve"]
    assert c["image"].split(":")[0] == f"referral-system/{name}"
    ports = {port["name"]: port["containerPort"] for port in c["ports"]}
    assert ports == {"http": SERVICES[name]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in c:
            assert c[probe]["httpGet"]["port"] in (*ports, *ports.values()), f"{name}: {probe} port"


def test_every_container_has_requests_and_limits(rendered: list[Object]) -> None:
    for obj in rendered:
        if obj["kind"] not in WORKLOADS:
            continue
        for c in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", []):
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), (
                    f"{obj['kind']} {obj['metadata']['name']}/{c['name']}: {bound} for cpu and memory"
                )


def test_every_container_runs_locked_down(rendered: list[Object]) -> None:
    for obj in rendered:
        if obj["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(obj)
        pod_context = spec.get("securityContext", {})
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for c in spec["containers"]:
            where = f"{obj['kind']} {obj['metadata']['name']}/{c['name']}"
            context = pod_context | c.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert context.get("runAsUser", 0) != 0, f"{where}: a numeric non-root runAsUser"
            assert context.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert context.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            mounts = {mount["mountPath"]: mount["name"] for mount in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp emptyDir"


def test_autoscalers_target_existing_deployments(rendered: list[Object]) -> None:
    deployments = objects_of(rendered, "Deployment")
    autoscalers = objects_of(rendered, "HorizontalPodAutoscaler")
    assert set(autoscalers) == {*SERVICES, "gateway"}
    for name, hpa in autoscalers.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in deployments, f"HPA {name} targets a Deployment that does not exist"
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = [
            (m["type"], m["resource"]["name"], m["resource"]["target"]["type"])
            for m in hpa["spec"]["metrics"]
        ]
        assert ("Resource", "cpu", "Utilization") in metrics
        # A CPU utilization target means nothing without a CPU request.
        assert all(
            "cpu" in c["resources"]["requests"] for c in pod_spec(deployments[target["name"]])["containers"]
        )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_migration_jobs(rendered: list[Object], name: str) -> None:
    job = one(rendered, "Job", f"{name}-migrate")
    c = container(job)
    assert c["command"] == ["python", "-m", f"services.{name}", "migrate"]
    assert c["image"] == container(one(rendered, "Deployment", name))["image"], "the release's own image"
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")


def test_services_select_existing_pods(rendered: list[Object]) -> None:
    deployments = objects_of(rendered, "Deployment")
    jobs = objects_of(rendered, "Job")
    for name, service in objects_of(rendered, "Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        selector = service["spec"]["selector"]
        assert selector, f"Service {name} selects nothing"
        selected = [d for d in deployments.values() if matches(selector, template_labels(d))]
        assert len(selected) == 1, f"Service {name} must select exactly one Deployment's pods"
        assert not [j for j in jobs.values() if matches(selector, template_labels(j))], (
            f"Service {name} would send traffic to migration pods"
        )
        assert matches(selected[0]["spec"]["selector"]["matchLabels"], template_labels(selected[0]))
        port_names = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: no container port {port['targetPort']}"
    # The gateway's upstreams and the services' URLs to each other use these names and ports.
    for name, port in SERVICES.items():
        assert [p["port"] for p in objects_of(rendered, "Service")[name]["spec"]["ports"]] == [port]


def test_ingress_reaches_the_gateway(rendered: list[Object]) -> None:
    ingress = one(rendered, "Ingress", "gateway")
    service = one(rendered, "Service", "gateway")
    backends = [
        path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]
    ]
    assert backends and all(backend["name"] == "gateway" for backend in backends)
    service_ports = {port["name"] for port in service["spec"]["ports"]} | {
        p["port"] for p in service["spec"]["ports"]
    }
    assert all(
        backend["port"].get("name", backend["port"].get("number")) in service_ports for backend in backends
    )
    config = config_map_named(
        rendered, container(one(rendered, "Deployment", "auth"))["envFrom"][0]["configMapRef"]["name"]
    )
    public_host = urlsplit(config["data"]["AUTH_PUBLIC_BASE_URL"]).hostname
    assert {rule.get("host") for rule in ingress["spec"]["rules"]} == {public_host}, (
        "the Ingress host and AUTH_PUBLIC_BASE_URL must agree"
    )


def test_no_secret_is_committed_and_references_name_the_documented_one(rendered: list[Object]) -> None:
    assert not objects_of(rendered, "Secret"), "never commit a Secret: create it with kubectl (README)"
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secretGenerator" not in kustomization
    command = readme_secret_command()
    documented = set(re.findall(r"--from-(?:literal|file)=([A-Z][A-Z0-9_]*)=", command))
    assert documented >= REQUIRED_SECRET_KEYS, f"README's command must set {sorted(REQUIRED_SECRET_KEYS)}"
    seen_keys = set()
    for obj in rendered:
        if obj["kind"] not in WORKLOADS:
            continue
        for name, key in secret_refs(obj):
            assert name == SECRET, f"{obj['metadata']['name']} refers to Secret {name!r}, not {SECRET!r}"
            if key:
                seen_keys.add(key)
                assert key in documented, f"README's `kubectl create secret` does not set {key}"
    assert seen_keys == REQUIRED_SECRET_KEYS
    # The referral service never sees the auth service's signing keys.
    for name in ("referral", "referral-migrate"):
        obj = one(rendered, "Deployment" if name == "referral" else "Job", name)
        assert {key for _, key in secret_refs(obj)} == {"DATABASE_URL", "REDIS_URL"}


def test_config_maps_hold_no_secrets(rendered: list[Object], generated_names: set[str]) -> None:
    sensitive = {
        "DATABASE_URL",
        "REDIS_URL",
        "AUTH_JWT_PRIVATE_KEYS",
        "AUTH_HUNTER_API_KEY",
        "AUTH_ENRICHMENT_API_KEY",
    }
    for name, config_map in objects_of(rendered, "ConfigMap").items():
        keys = set(config_map.get("data", {}))
        assert not keys & sensitive, (
            f"ConfigMap {name} holds {sorted(keys & sensitive)}: put them in the Secret"
        )
        assert not [key for key in keys if key.endswith("_CLIENT_SECRET")]
        assert unhashed(name, generated_names) in generated_names


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_settings_load_from_the_config_and_the_secret(rendered: list[Object], name: str) -> None:
    """Each workload's environment, with a Secret as README creates it, is valid settings that agree."""
    secret = {**EXAMPLE_SECRET, "AUTH_JWT_PRIVATE_KEYS": generate_pem()}
    auth_env = environment(rendered, one(rendered, "Deployment", "auth"), secret)
    referral_env = environment(rendered, one(rendered, "Deployment", "referral"), secret)
    auth = load_auth_settings(auth_env)
    referral = load_settings(ReferralSettings, REFERRAL_PREFIX, referral_env)
    assert auth.hunter_api_key == "hunter-key", "optional Secret keys reach the auth service"
    assert not any(key.startswith("AUTH_") for key in referral_env)
    assert referral.auth_issuer == auth.issuer
    assert (auth.host, auth.port) == ("0.0.0.0", SERVICES["auth"])
    assert (referral.host, referral.port) == ("0.0.0.0", SERVICES["referral"])
    assert auth.referral_service_url == f"http://referral:{SERVICES['referral']}"
    assert referral.auth_jwks_url == f"http://auth:{SERVICES['auth']}/api/v1/auth/.well-known/jwks.json"
    assert auth.trusted_proxies and all(ipaddress.ip_network(proxy) for proxy in auth.trusted_proxies)
    known = {
        "auth": {n for n, _, _ in describe(AuthSettings, AUTH_PREFIX)},
        "referral": {n for n, _, _ in describe(ReferralSettings, REFERRAL_PREFIX)},
    }[name]
    env = auth_env if name == "auth" else referral_env
    unknown = {
        key for key in env if key not in known and not key.startswith("AUTH_OAUTH_") and key not in secret
    }
    assert not unknown, f"the {name} service reads no {sorted(unknown)}"
    job_env = environment(rendered, one(rendered, "Job", f"{name}-migrate"), secret)
    if name == "auth":
        load_auth_settings(job_env)
    else:
        load_settings(ReferralSettings, REFERRAL_PREFIX, job_env)


def test_gateway(rendered: list[Object], generated_names: set[str]) -> None:
    deployment = one(rendered, "Deployment", "gateway")
    c = container(deployment)
    assert re.fullmatch(r"nginx:1\.\d+(\.\d+)?-alpine", c["image"]), c["image"]
    assert [port["containerPort"] for port in c["ports"]] == [8080]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/nginx/nginx.conf")
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    config_map = config_map_named(rendered, volume["configMap"]["name"])
    assert unhashed(config_map["metadata"]["name"], generated_names) == "gateway-nginx"
    assert mount["subPath"] in config_map["data"]
    # Its own configuration, not compose's: behind the Ingress controller, whose X-Forwarded-For it
    # believes.
    conf = config_map["data"][mount["subPath"]]
    assert conf == render(K8S), (
        f"the gateway ConfigMap is not render(K8S); run `python -m deploy.nginx.render` to rewrite"
        f" {K8S_CONF.relative_to(ROOT)}"
    )
    assert "real_ip_header X-Forwarded-For;" in conf


def test_images_can_be_overridden(rendered: list[Object]) -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    overridable = {image["name"] for image in kustomization.get("images", [])}
    used = {c["image"].split(":")[0] for c in containers_of_all(rendered)}
    assert used == {"referral-system/auth", "referral-system/referral", "nginx"}
    assert used <= overridable, f"add `images:` entries for {sorted(used - overridable)}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_stopping_pod_finishes_within_its_grace_period(rendered: list[Object], name: str) -> None:
    """preStop (new connections stop arriving), then SIGTERM: drain, requests in flight, cleanup; all
    before the kubelet's SIGKILL."""
    deployment = one(rendered, "Deployment", name)
    c = container(deployment)
    pause = pre_stop_pause(c)
    assert pause >= 5, "endpoints and kube-proxy need a few seconds to stop sending new connections"
    env = environment(rendered, deployment, {**EXAMPLE_SECRET, "AUTH_JWT_PRIVATE_KEYS": generate_pem()})
    if name == "auth":
        auth = load_auth_settings(env)
        drain, in_flight = auth.shutdown_drain, auth.shutdown_timeout
        # The cleanup contexts: the outbox relay's last delivery, then the enrichments in flight.
        # The outbox relays stop together (each lets its delivery under way finish), then the enrichments.
        relays = max(auth.referral_timeout, auth.smtp_timeout) + LEASE_MARGIN / 2
        cleanup = relays + auth.enrichment_shutdown_grace
    else:
        referral = load_settings(ReferralSettings, REFERRAL_PREFIX, env)
        drain, in_flight, cleanup = referral.shutdown_drain, referral.shutdown_timeout, 0.0
    # The gateway's idle upstream connections are closed by nginx before the drain ends.
    assert K8S.upstream_keepalive_timeout < drain
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace >= pause + drain + in_flight + cleanup + 3, (name, grace)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 from the moment SIGTERM arrives


def test_the_gateway_outlasts_what_it_proxies(rendered: list[Object]) -> None:
    deployment = one(rendered, "Deployment", "gateway")
    pause = pre_stop_pause(container(deployment))
    assert pause >= 5
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= pause + K8S.proxy_timeout + 3


def _cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_autoscalers_are_the_capacity_plans_and_pools_fit_postgresql(rendered: list[Object]) -> None:
    """The README's capacity plan (tests/perf/capacity.py) sizes pods as these manifests do: a service
    pod one core, a gateway pod half a core, each kept at the HPA's utilization, pools of POOL_MAX;
    and every pod the autoscalers allow, with its full pool, fits PostgreSQL's max_connections."""
    deployments = objects_of(rendered, "Deployment")
    autoscalers = objects_of(rendered, "HorizontalPodAutoscaler")
    connections = 0
    for name, hpa in autoscalers.items():
        pod = container(deployments[name])
        requested = _cores(pod["resources"]["requests"]["cpu"])
        assert requested == (capacity.GATEWAY_POD_CPU if name == "gateway" else capacity.POD_CPU), name
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["target"]["averageUtilization"] == round(100 * capacity.HPA_UTILIZATION)
        assert hpa["spec"]["minReplicas"] == capacity.MIN_PODS
        if name in SERVICES:
            (source,) = [s for s in pod["envFrom"] if "configMapRef" in s]
            data = config_map_named(rendered, source["configMapRef"]["name"])["data"]
            pool = int(data[f"{name.upper()}_DB_POOL_MAX"])
            assert pool == capacity.POOL_MAX
            connections += hpa["spec"]["maxReplicas"] * pool
    jobs = len(objects_of(rendered, "Job"))  # a migration job holds one connection while it runs
    assert connections + jobs <= capacity.PG_MAX_CONNECTIONS


@pytest.mark.parametrize("name", [*sorted(SERVICES), "gateway"])
def test_voluntary_disruptions_leave_a_pod_of_each_deployment(rendered: list[Object], name: str) -> None:
    budget = one(rendered, "PodDisruptionBudget", name)
    selector = budget["spec"]["selector"]["matchLabels"]
    selected = [
        d for d in objects_of(rendered, "Deployment").values() if matches(selector, template_labels(d))
    ]
    assert [d["metadata"]["name"] for d in selected] == [name]
    assert not [j for j in objects_of(rendered, "Job").values() if matches(selector, template_labels(j))]
    minimum = selected[0]["spec"]["replicas"]
    autoscaler = objects_of(rendered, "HorizontalPodAutoscaler").get(name)
    if autoscaler:
        minimum = min(minimum, autoscaler["spec"]["minReplicas"])
    # At least one pod stays, and a drain can still move one (a budget equal to the replicas blocks it).
    assert 1 <= budget["spec"]["minAvailable"] < minimum


@pytest.mark.parametrize(("name", "other"), [("auth", "referral"), ("referral", "auth")])
def test_only_the_gateway_and_the_other_service_reach_a_service(
    rendered: list[Object], name: str, other: str
) -> None:
    policy = one(rendered, "NetworkPolicy", name)
    deployments = objects_of(rendered, "Deployment")
    workloads = {**deployments, **objects_of(rendered, "Job")}
    guarded = [
        w
        for w, obj in workloads.items()
        if matches(policy["spec"]["podSelector"]["matchLabels"], template_labels(obj))
    ]
    assert guarded == [name]
    assert "Ingress" in policy["spec"]["policyTypes"]
    sources: set[str] = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"{peer}: only pods of this namespace, by label"
            labels = peer["podSelector"].get("matchLabels")
            assert labels, "an empty podSelector admits every pod"
            sources |= {w for w, obj in workloads.items() if matches(labels, template_labels(obj))}
        ports = rule.get("ports")
        assert ports, "a rule without `ports` admits every port"
        container_ports = {p["name"]: p["containerPort"] for p in container(deployments[name])["ports"]}
        assert {container_ports.get(p["port"], p["port"]) for p in ports} == {SERVICES[name]}
    assert sources == {"gateway", other}
