"""The Helm charts under helm/ (SPEC §10): Helm's own Go SDK (helm-python-sdk) lints
and renders the demo chart, which uses the library chart, for every value set in
helm/hms-sidecar-demo/ci/; every rendered object is validated against the
Kubernetes 1.29 and 1.33 schemas (kubernetes-validate, strict), and the tests check
what matters: native versus legacy placement, the restricted security context,
secrets only as mounted files, the grace period, the ConfigMap passing
`sidecar check-config` with the pod's environment, and ports that agree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from helm_python import _native  # render options the wrapper does not expose (see render())

from sidecar import __version__
from sidecar.config import parse_duration

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / "helm"
LIB = HELM / "hms-sidecar-lib"
DEMO = HELM / "hms-sidecar-demo"
CONSUMER = ROOT / "tests" / "unit" / "helm_consumer"  # uses the library with `.`
RULES = ROOT / "deploy" / "prometheus" / "sidecar-alerts.rules.yml"
CI_VALUES = sorted(p.stem.removesuffix("-values") for p in (DEMO / "ci").glob("*-values.yaml"))
KUBE_SCHEMAS = ("1.29.0", "1.33.0")
# Custom resources: kubernetes-validate has no schema for them. Everything else is validated.
CRD_KINDS = frozenset({"PodMonitor", "PrometheusRule"})
MONITORING_API = "monitoring.coreos.com/v1"
RELEASE = "demo"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def charts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of helm/ and of the test-only consumer chart, in the same layout, so
    the tests never write charts/ into the worktree."""
    copy = tmp_path_factory.mktemp("charts")
    shutil.copytree(HELM, copy / "helm", ignore=shutil.ignore_patterns("charts"))
    shutil.copytree(CONSUMER, copy / CONSUMER.relative_to(ROOT))
    return copy


@pytest.fixture(scope="module")
def demo(charts: Path) -> Path:
    """The demo chart with charts/ built from its Chart.lock (`helm dependency build`:
    the library packaged from ../hms-sidecar-lib)."""
    chart = charts / "helm" / DEMO.name
    helm_python.dependency_build(chart)
    return chart


@pytest.fixture(scope="module")
def consumer(charts: Path) -> Path:
    """The test-only consumer chart with its dependency resolved (no lock file)."""
    chart = charts / CONSUMER.relative_to(ROOT)
    helm_python.dependency_update(chart)
    return chart


def ci_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((DEMO / "ci" / f"{name}-values.yaml").read_text())
    return values


def render(
    chart_dir: Path,
    values: dict[str, Any] | None = None,
    *,
    kube_version: str | None = None,
    api_versions: tuple[str, ...] = (),
) -> list[Manifest]:
    """Every object the chart renders (NOTES.txt excluded). `helm_render` takes
    `kube_version` and `api_versions` (helm template --kube-version / --api-versions)
    in its options; Chart.render() does not pass them yet, so call it directly."""
    options: dict[str, Any] = {"name": RELEASE, "namespace": "shop"}
    if kube_version is not None:
        options["kube_version"] = kube_version
    if api_versions:
        options["api_versions"] = list(api_versions)
    with helm_python.Chart.load(chart_dir) as chart:
        rendered: dict[str, str] = json.loads(
            _native.call_string(
                "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)
            )
        )
    return [
        document
        for name, text in sorted(rendered.items())
        if not name.endswith("NOTES.txt")
        for document in yaml.safe_load_all(text)
        if document
    ]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] == "Pod":
            yield name, manifest["spec"]
        elif manifest["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, manifest["spec"]["template"]["spec"]


def sidecar_of(spec: Manifest) -> tuple[str, Manifest] | None:
    """("initContainers" | "containers", the sidecar container), or None."""
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            if container["name"] == "sidecar":
                return field, container
    return None


def sidecar_pods(manifests: list[Manifest]) -> list[tuple[str, Manifest, Manifest]]:
    """(name, pod spec, sidecar container) of every pod that carries the sidecar."""
    found = []
    for name, spec in pod_specs(manifests):
        placed = sidecar_of(spec)
        if placed is not None:
            found.append((name, spec, placed[1]))
    return found


def sidecar_config(manifests: list[Manifest], spec: Manifest) -> dict[str, Any]:
    """The sidecar.yaml of the ConfigMap mounted by this pod."""
    volume = next(v for v in spec["volumes"] if v["name"] == "sidecar-config")
    name = volume["configMap"]["name"]
    config_map = next(
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == name
    )
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["sidecar.yaml"])
    return config


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def rendered(demo: Path) -> dict[str, list[Manifest]]:
    """Each ci value set rendered for a 1.33 cluster that serves the monitoring CRDs."""
    return {
        name: render(demo, ci_values(name), api_versions=(MONITORING_API,)) for name in CI_VALUES
    }


class TestLint:
    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_demo_chart_lints_strict(self, demo: Path, values_name: str) -> None:
        """`helm lint --strict` of the demo chart (with its library) reports no warning or
        error for each ci value set."""
        report = helm_python.lint(demo, ci_values(values_name), strict=True, with_subcharts=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert ([], []) == (problems, report["errors"])

    def test_library_chart_lints_strict(self, demo: Path) -> None:
        """The library chart lints strict on its own (a library is not rendered)."""
        report = helm_python.lint(demo.parent / LIB.name, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert ([], []) == (problems, report["errors"])

    def test_ci_values_cover_the_variants(self) -> None:
        """The value sets the checklist asks for exist."""
        wanted = {
            "native",
            "legacy",
            "monitoring",
            "monitoring-off",
            "consul-agent",
            "consul-catalog",
            "minimal",
        }
        assert wanted <= set(CI_VALUES)


class TestKubernetesSchemas:
    @pytest.mark.parametrize("kube", KUBE_SCHEMAS)
    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_every_manifest_validates(
        self, rendered: dict[str, list[Manifest]], values_name: str, kube: str
    ) -> None:
        """Every rendered object but the named custom resources is valid for Kubernetes
        1.29 and 1.33 (strict: no unknown fields)."""
        failures = []
        for manifest in rendered[values_name]:
            if manifest["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(manifest, kube, strict=True)
            except kubernetes_validate.ValidationError as error:
                failures.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {error}")
        assert [] == failures


class TestPlacement:
    def test_native_sidecar_is_a_restartable_init_container(
        self, rendered: dict[str, list[Manifest]]
    ) -> None:
        """Native mode: the sidecar is the first init container with restartPolicy Always
        and a startupProbe on /ready at the admin port, so the app starts once it is
        ready and it stops after the app."""
        pods = sidecar_pods(rendered["native"])
        assert len(pods) == 4  # orders, billing, the two Jobs (the legacy Job stays legacy)
        for name, spec, sidecar in pods:
            if name.endswith("job-legacy"):
                continue
            admin = port_of(sidecar_config(rendered["native"], spec)["admin"]["listen"])
            assert "sidecar" == spec["initContainers"][0]["name"], name
            assert "Always" == sidecar["restartPolicy"]
            assert {"path": "/ready", "port": admin} == sidecar["startupProbe"]["httpGet"]
            assert all(c["name"] != "sidecar" for c in spec["containers"])

    def test_legacy_sidecar_is_the_first_container_with_hooks(
        self, rendered: dict[str, list[Manifest]]
    ) -> None:
        """Legacy mode: the sidecar is first in containers, with a postStart hook that
        waits for /ready (the kubelet starts the app after it) and the configured
        preStop delay; no init container."""
        pods = sidecar_pods(rendered["legacy"])
        assert pods
        for name, spec, sidecar in pods:
            assert "sidecar" == spec["containers"][0]["name"], name
            assert "restartPolicy" not in sidecar
            assert not spec.get("initContainers")
            wait = sidecar["lifecycle"]["postStart"]["exec"]["command"]
            assert "/opt/venv/bin/python" == wait[0]
            assert "http://127.0.0.1:9902/ready" in wait[2]
            assert "time.sleep(3)" in sidecar["lifecycle"]["preStop"]["exec"]["command"][2]

    def test_jobs_end_in_both_modes(self, rendered: dict[str, list[Manifest]]) -> None:
        """The native Job's app simply exits; the legacy Job's app stops its sidecar with
        POST /v1/shutdown on the loopback admin address."""
        jobs = {m["metadata"]["name"]: m for m in rendered["native"] if m["kind"] == "Job"}
        native = jobs[f"{RELEASE}-hms-sidecar-demo-job-native"]["spec"]["template"]["spec"]
        legacy = jobs[f"{RELEASE}-hms-sidecar-demo-job-legacy"]["spec"]["template"]["spec"]
        assert "sidecar" == native["initContainers"][0]["name"]
        assert "/v1/shutdown" not in native["containers"][0]["args"][0]
        assert "sidecar" == legacy["containers"][0]["name"]
        script = legacy["containers"][1]["args"][0]
        assert 'curl -fsS -X POST "$SIDECAR_ADMIN_URL/v1/shutdown"' in script
        admin_url = {e["name"]: e.get("value") for e in legacy["containers"][1]["env"]}
        assert "http://127.0.0.1:9902" == admin_url["SIDECAR_ADMIN_URL"]
        assert {"Never"} == {native["restartPolicy"], legacy["restartPolicy"]}

    def test_native_mode_fails_below_kubernetes_1_29(self, demo: Path) -> None:
        """Native sidecars need 1.29: the render fails with advice on an older cluster,
        and the legacy value set renders there."""
        with pytest.raises(helm_python.HelmRenderError, match=r"set sidecar.mode: legacy"):
            render(demo, ci_values("native"), kube_version="v1.28.9")
        assert sidecar_pods(render(demo, ci_values("legacy"), kube_version="v1.28.9"))

    def test_legacy_mode_renders_on_older_clusters_without_the_native_job(self, demo: Path) -> None:
        """sidecar.mode: legacy with the default Jobs on 1.25 and 1.28: renders; the
        native Job (which needs 1.29) is left out, the legacy one stays."""
        for version in ("v1.25.0", "v1.28.9"):
            manifests = render(demo, {"sidecar": {"mode": "legacy"}}, kube_version=version)
            jobs = [m["metadata"]["name"] for m in manifests if m["kind"] == "Job"]
            assert [name for name in jobs if name.endswith("job-legacy")] == jobs
            assert jobs


class TestSecurity:
    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_every_pod_meets_the_restricted_profile(
        self, rendered: dict[str, list[Manifest]], values_name: str
    ) -> None:
        """Every pod and container the charts render meets the restricted Pod Security
        profile; the sidecar also runs as 10001 with a read-only root filesystem."""
        for name, spec in pod_specs(rendered[values_name]):
            pod = spec["securityContext"]
            assert {"type": "RuntimeDefault"} == pod["seccompProfile"], name
            assert pod["runAsNonRoot"] is True, name
            assert spec.get("automountServiceAccountToken") is False, name
            for container in (spec.get("initContainers") or []) + spec["containers"]:
                context = container["securityContext"]
                where = f"{name} {container['name']}"
                assert context["allowPrivilegeEscalation"] is False, where
                assert ["ALL"] == context["capabilities"]["drop"], where
                assert "add" not in context["capabilities"], where
                assert context.get("privileged", False) is False, where
                if container["name"] == "sidecar":
                    assert context["readOnlyRootFilesystem"] is True
                    assert (10001, 10001) == (context["runAsUser"], context["runAsGroup"])
                    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
                    assert container["resources"]["limits"]["memory"]

    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_no_secret_in_any_env_value(
        self, rendered: dict[str, list[Manifest]], values_name: str
    ) -> None:
        """No env var carries a secret as its value: no URL with a password, no token
        or password variable with a value; the sidecar gets them as files from Secret
        volumes (SIDECAR_AMQP_URL_FILE, CONSUL_HTTP_TOKEN_FILE)."""
        credentials = re.compile(r"://[^/@\s]+:[^/@\s]+@")
        for name, spec in pod_specs(rendered[values_name]):
            for container in (spec.get("initContainers") or []) + spec["containers"]:
                for env in container.get("env", []):
                    where = f"{name} {container['name']} {env['name']}"
                    if "value" not in env:
                        continue
                    assert not credentials.search(str(env["value"])), where
                    assert not re.search(r"(TOKEN|PASSWORD|SECRET|AMQP_URL)$", env["name"]), where
            placed = sidecar_of(spec)
            if placed is None:
                continue
            sidecar = placed[1]
            mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
            secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
            env = {e["name"]: e.get("value") for e in sidecar["env"]}
            for variable in ("SIDECAR_AMQP_URL_FILE", "CONSUL_HTTP_TOKEN_FILE"):
                if variable in env:
                    volume = next(n for n, path in mounts.items() if env[variable].startswith(path))
                    assert volume in secret_volumes, f"{name} {variable}"

    def test_secrets_are_mounted_when_configured(self, rendered: dict[str, list[Manifest]]) -> None:
        """With the Secrets named, the sidecar reads the URL and the token from files."""
        _, _, sidecar = sidecar_pods(rendered["consul-agent"])[0]
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert "/var/run/secrets/hms-sidecar/amqp/url" == env["SIDECAR_AMQP_URL_FILE"]
        assert "/var/run/secrets/hms-sidecar/consul-token/token" == env["CONSUL_HTTP_TOKEN_FILE"]

    def test_schema_refuses_secrets_in_the_config(self, demo: Path) -> None:
        """values.schema.json (the library's, applied to `sidecar:`) refuses an AMQP URL
        or a Consul token in the ConfigMap, and an unknown mode."""
        for bad in (
            {"config": {"events": {"amqp_url": "amqp://u:p@rabbit/"}}},
            {"config": {"consul": {"token": "s3cr3t"}}},
            {"mode": "sidecarless"},
            {"extraEnv": [{"name": "CONSUL_HTTP_TOKEN", "value": "s3cr3t"}]},
            {"extraEnv": [{"name": "OTEL_EXPORTER_OTLP_HEADERS", "value": "authorization=x"}]},
            {"tracing": {"samplerArg": "abc"}},
            {"tracing": {"samplerArg": 2}},
        ):
            with pytest.raises(helm_python.HelmValuesError):
                render(demo, {"sidecar": bad})

    def test_a_secret_env_value_is_refused_in_any_values_block(self, demo: Path) -> None:
        """The schema only sees `sidecar:`; a workload's own block (orders.sidecar) is
        checked by the templates: a literal secret value fails the render, the same
        variable from a Secret (valueFrom) renders."""
        literal = {"name": "CONSUL_HTTP_TOKEN", "value": "s3cr3t"}
        with pytest.raises(helm_python.HelmRenderError, match="CONSUL_HTTP_TOKEN"):
            render(demo, {"orders": {"sidecar": {"extraEnv": [literal]}}})
        from_secret = {
            "name": "CONSUL_HTTP_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "consul", "key": "token"}},
        }
        manifests = render(demo, {"sidecar": {"extraEnv": [from_secret]}})
        assert any(
            e.get("valueFrom") == from_secret["valueFrom"]
            for _, _, sidecar in sidecar_pods(manifests)
            for e in sidecar.get("env", [])
        )


class TestConfig:
    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_rendered_config_passes_check_config(
        self, rendered: dict[str, list[Manifest]], values_name: str, tmp_path: Path
    ) -> None:
        """Each sidecar's ConfigMap passes `sidecar check-config` (this worktree's code)
        run with the environment the pod gives it: downward-API values filled in, the
        mounted Secret files present, the spool on a writable path."""
        manifests = rendered[values_name]
        for index, (name, spec, sidecar) in enumerate(sidecar_pods(manifests)):
            workdir = tmp_path / str(index)
            workdir.mkdir()
            config = workdir / "sidecar.yaml"
            config.write_text(yaml.safe_dump(sidecar_config(manifests, spec)))
            env = pod_env(sidecar, workdir)
            mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
            assert f"{mounts['sidecar-config']}/sidecar.yaml" == env["SIDECAR_CONFIG"], name
            result = check_config(config, env, workdir)
            assert 0 == result.returncode, f"{name}: {result.stdout}{result.stderr}"
            assert "admin 0.0.0.0:9902" in result.stdout

    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_probe_ports_match_the_admin_listener(
        self, rendered: dict[str, list[Manifest]], values_name: str
    ) -> None:
        """The probes, the container port and the Services' admin port all use the admin
        listener's port from the rendered config; the probes use /ready and /live."""
        manifests = rendered[values_name]
        for name, spec, sidecar in sidecar_pods(manifests):
            admin = port_of(sidecar_config(manifests, spec)["admin"]["listen"])
            probes = {
                kind: sidecar[kind]["httpGet"]
                for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            }
            assert {
                "startupProbe": {"path": "/ready", "port": admin},
                "readinessProbe": {"path": "/ready", "port": admin},
                "livenessProbe": {"path": "/live", "port": admin},
            } == probes, name
            assert [{"name": "sidecar-admin", "containerPort": admin, "protocol": "TCP"}] == (
                sidecar["ports"]
            )
        for service in (m for m in manifests if m["kind"] == "Service"):
            for port in service["spec"]["ports"]:
                if port["name"] == "sidecar-admin":
                    assert 9902 == port["port"]
                    # By number: a named targetPort on a native sidecar (an init
                    # container) has no endpoints before Kubernetes 1.32.
                    assert admin == port["targetPort"]

    @pytest.mark.parametrize("values_name", CI_VALUES)
    def test_grace_period_covers_the_stop(
        self, rendered: dict[str, list[Manifest]], values_name: str
    ) -> None:
        """terminationGracePeriodSeconds is at least shutdown.drain + grace of the
        rendered config, with the legacy preStop sleep before it, and in native mode
        the app's stop time on top (the sidecar gets SIGTERM only after the app exited)."""
        manifests = rendered[values_name]
        sidecar_values = ci_values(values_name).get("sidecar", {})
        app_seconds = sidecar_values.get("appShutdownSeconds", 10)
        pre_stop = sidecar_values.get("legacy", {}).get("preStopSleepSeconds", 0)
        for name, spec, sidecar in sidecar_pods(manifests):
            shutdown = sidecar_config(manifests, spec)["shutdown"]
            drain, grace = parse_duration(shutdown["drain"]), parse_duration(shutdown["grace"])
            if "restartPolicy" in sidecar:  # native
                needed = app_seconds + drain + grace
            else:
                needed = max(app_seconds, pre_stop + drain + grace)
            assert spec["terminationGracePeriodSeconds"] >= needed, name

    def test_explicit_grace_period_below_the_need_fails(self, demo: Path) -> None:
        """An explicit terminationGracePeriodSeconds shorter than the stop needs fails."""
        with pytest.raises(helm_python.HelmRenderError, match="below the 35s the stop needs"):
            render(demo, {"sidecar": {"terminationGracePeriodSeconds": 15}})

    def test_consul_agent_mode_uses_the_host_ip(self, rendered: dict[str, list[Manifest]]) -> None:
        """Agent mode: CONSUL_HTTP_ADDR is the node's agent at $(HOST_IP), HOST_IP from
        the downward API, and the pod IP is the registered address."""
        for name, _, sidecar in sidecar_pods(rendered["consul-agent"]):
            if "job-" in name:  # the demo's Jobs do not register
                continue
            env = {e["name"]: e for e in sidecar["env"]}
            assert "http://$(HOST_IP):8500" == env["CONSUL_HTTP_ADDR"]["value"]
            assert "status.hostIP" == env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"]
            names = list(env)
            assert names.index("HOST_IP") < names.index("CONSUL_HTTP_ADDR")
            assert (
                "status.podIP"
                == (env["SIDECAR_SERVICE_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"])
            )

    def test_consul_catalog_mode_uses_the_servers(
        self, rendered: dict[str, list[Manifest]]
    ) -> None:
        """Catalog mode: the servers' address and the mode are in the config, the node
        is the pod's name, and the CA comes from a mounted Secret."""
        manifests = rendered["consul-catalog"]
        for name, spec, sidecar in sidecar_pods(manifests):
            if "job-" in name:
                continue
            consul = sidecar_config(manifests, spec)["consul"]
            assert {
                "enabled": True,
                "mode": "catalog",
                "address": "https://consul-server.consul.svc:8501",
            } == consul
            env = {e["name"]: e for e in sidecar["env"]}
            assert (
                "metadata.name" == env["SIDECAR_CONSUL_NODE"]["valueFrom"]["fieldRef"]["fieldPath"]
            )
            assert (
                "/var/run/secrets/hms-sidecar/consul-ca/tls.crt" == (env["CONSUL_CACERT"]["value"])
            )

    def test_traces_go_to_the_demo_jaeger(self, rendered: dict[str, list[Manifest]]) -> None:
        """With jaeger.enabled the sidecars' OTEL_* env points at the demo's Jaeger
        collector Service, which serves OTLP/HTTP on 4318."""
        manifests = rendered["monitoring"]
        jaeger = f"{RELEASE}-hms-sidecar-demo-jaeger"
        service = next(
            m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == jaeger
        )
        assert 4318 in {p["port"] for p in service["spec"]["ports"]}
        for _, _, sidecar in sidecar_pods(manifests):
            env = {e["name"]: e.get("value") for e in sidecar["env"]}
            assert f"http://{jaeger}:4318" == env["OTEL_EXPORTER_OTLP_ENDPOINT"]
            assert "http/protobuf" == env["OTEL_EXPORTER_OTLP_PROTOCOL"]
            assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]


class TestMonitoring:
    def test_pod_monitor_scrapes_the_admin_port(self, rendered: dict[str, list[Manifest]]) -> None:
        """The PodMonitor scrapes /metrics on the port named sidecar-admin, which is the
        admin listener's port, and selects exactly the pods that carry a sidecar."""
        manifests = rendered["monitoring"]
        (monitor,) = [m for m in manifests if m["kind"] == "PodMonitor"]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert ("sidecar-admin", "/metrics") == (endpoint["port"], endpoint["path"])
        assert "kube-prometheus-stack" == monitor["metadata"]["labels"]["release"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        for name, spec, sidecar in sidecar_pods(manifests):
            admin = port_of(sidecar_config(manifests, spec)["admin"]["listen"])
            ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
            assert admin == ports[endpoint["port"]], name
        for manifest in manifests:
            if manifest["kind"] in ("Deployment", "Job"):
                template = manifest["spec"]["template"]
                selected = selector.items() <= template["metadata"]["labels"].items()
                has_sidecar = sidecar_of(template["spec"]) is not None
                assert has_sidecar == selected, manifest["metadata"]["name"]

    def test_prometheus_rule_is_the_shipped_rule_file(
        self, rendered: dict[str, list[Manifest]]
    ) -> None:
        """The PrometheusRule's groups are deploy/prometheus/sidecar-alerts.rules.yml."""
        (rule,) = [m for m in rendered["monitoring"] if m["kind"] == "PrometheusRule"]
        assert yaml.safe_load(RULES.read_text())["groups"] == rule["spec"]["groups"]

    def test_monitoring_objects_need_the_api(self, demo: Path) -> None:
        """Without monitoring.coreos.com/v1 on the cluster, no PodMonitor or
        PrometheusRule is rendered even when enabled; with the flags off, none either."""
        kinds = {m["kind"] for m in render(demo, ci_values("monitoring"))}
        assert not kinds & CRD_KINDS
        assert {"PodMonitor", "PrometheusRule"} <= {
            m["kind"] for m in render(demo, ci_values("monitoring"), api_versions=(MONITORING_API,))
        }
        off = render(demo, ci_values("monitoring-off"), api_versions=(MONITORING_API,))
        assert not {m["kind"] for m in off} & CRD_KINDS

    def test_helm_test_pod_checks_ready_and_metrics(
        self, rendered: dict[str, list[Manifest]]
    ) -> None:
        """The `helm test` hook pod curls /ready and /metrics of each service's sidecar."""
        (pod,) = [m for m in rendered["native"] if m["kind"] == "Pod"]
        assert "test" == pod["metadata"]["annotations"]["helm.sh/hook"]
        script = pod["spec"]["containers"][0]["args"][0]
        for service in ("orders", "billing"):
            assert f"{RELEASE}-hms-sidecar-demo-{service}:9902" in script
        assert '"http://$target/ready"' in script
        assert '"http://$target/metrics"' in script


class TestConsumerChart:
    """A chart of one StatefulSet using the library with the root context, the way
    helm/hms-sidecar-lib/README.md shows, with a per-pod spool claim."""

    def test_consumer_lints_and_validates(self, consumer: Path) -> None:
        """It lints strict, and what it renders is valid for Kubernetes 1.29 and 1.33."""
        report = helm_python.lint(consumer, strict=True)
        assert [] == [m for m in report["messages"] if m["severity"] >= 2]
        for manifest in render(consumer):
            for kube in KUBE_SCHEMAS:
                kubernetes_validate.validate(manifest, kube, strict=True)

    def test_spool_is_a_claim_per_pod(self, consumer: Path) -> None:
        """spool.type volumeClaimTemplate: no spool volume in the pod; the StatefulSet's
        claim template `sidecar-spool` (2Gi) is what the sidecar mounts."""
        (statefulset,) = [m for m in render(consumer) if m["kind"] == "StatefulSet"]
        spec = statefulset["spec"]["template"]["spec"]
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert ("sidecar-spool", "2Gi") == (
            claim["metadata"]["name"],
            claim["spec"]["resources"]["requests"]["storage"],
        )
        assert "sidecar-spool" not in {v["name"] for v in spec["volumes"]}
        _, sidecar = sidecar_of(spec) or ("", {})
        assert "sidecar-spool" in {m["name"] for m in sidecar["volumeMounts"]}
        assert "sidecar" == spec["initContainers"][0]["name"]

    def test_notes_and_test_pod_templates(self, consumer: Path) -> None:
        """The library's `notes` and `testPod` templates work from the root context."""
        with helm_python.Chart.load(consumer) as chart:
            notes = chart.render(name="ledger")["consumer/templates/NOTES.txt"]
        assert "Sidecar (native mode, image ghcr.io/hms/hms-sidecar:0.1.0)" in notes
        assert "Consul:           catalog mode (http://consul-server.consul.svc:8500)" in notes
        (pod,) = [m for m in render(consumer) if m["kind"] == "Pod"]
        assert "test" == pod["metadata"]["annotations"]["helm.sh/hook"]
        assert f"{RELEASE}-consumer:9902" in pod["spec"]["containers"][0]["args"][0]

    def test_consumer_config_passes_check_config(self, consumer: Path, tmp_path: Path) -> None:
        """Its ConfigMap (catalog mode by default, service name from values) passes
        `sidecar check-config` with the pod's environment."""
        manifests = render(consumer)
        ((name, spec, sidecar),) = sidecar_pods(manifests)
        config = tmp_path / "sidecar.yaml"
        config.write_text(yaml.safe_dump(sidecar_config(manifests, spec)))
        result = check_config(config, pod_env(sidecar, tmp_path), tmp_path)
        assert 0 == result.returncode, f"{name}: {result.stdout}{result.stderr}"
        assert "service ledger" in result.stdout


class TestChartFiles:
    def test_library_rule_file_is_the_deploy_file(self) -> None:
        """The library's copy of the alert rules (Helm reads only files inside a chart) is
        identical to deploy/prometheus/sidecar-alerts.rules.yml; sync it with `cp`."""
        assert RULES.read_text() == (LIB / "files" / RULES.name).read_text()

    def test_versions_agree(self) -> None:
        """The library's appVersion and default image tag are the sidecar's version, and
        the demo's dependency pins the library's chart version."""
        lib_chart = yaml.safe_load((LIB / "Chart.yaml").read_text())
        lib_values = yaml.safe_load((LIB / "values.yaml").read_text())
        demo_chart = yaml.safe_load((DEMO / "Chart.yaml").read_text())
        assert __version__ == lib_chart["appVersion"] == lib_values["image"]["tag"]
        (dependency,) = demo_chart["dependencies"]
        assert (lib_chart["name"], lib_chart["version"], "sidecar") == (
            dependency["name"],
            dependency["version"],
            dependency["alias"],
        )

    def test_readme_values_tables_are_current(self) -> None:
        """Each chart's README.md holds the values table generated from its values.yaml
        (regenerate: python scripts/helm_values_table.py --write helm/*)."""
        result = subprocess.run(
            [sys.executable, "scripts/helm_values_table.py", "--check", str(LIB), str(DEMO)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 0 == result.returncode, result.stderr


def check_config(config: Path, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar check-config` from the worktree (its code, not an installed
    copy) with only the pod's environment, SIDECAR_CONFIG pointing at `config`."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "HOME": str(home), **env, "SIDECAR_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pod_env(container: Manifest, workdir: Path) -> dict[str, str]:
    """The container's environment as the kubelet would build it on a test pod: the
    downward API filled with plausible values, $(VAR) references expanded, and every
    file the env names (mounted Secrets, the spool) moved into `workdir`."""
    fields = {
        "metadata.name": "demo-orders-7d9c5b6f4-x2x9q",
        "metadata.namespace": "shop",
        "spec.nodeName": "node-1",
        "status.podIP": "10.1.2.3",
        "status.hostIP": "10.0.0.1",
    }
    contents = {
        "SIDECAR_AMQP_URL_FILE": "amqp://app:s3cr3t@rabbitmq.shop.svc:5672/\n",
        "CONSUL_HTTP_TOKEN_FILE": "b1gs3cr3t-token\n",
        "CONSUL_CACERT": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    }
    env: dict[str, str] = {}
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(item["value"]))
        if item["name"] in contents:
            path = workdir / Path(value).name
            path.write_text(contents[item["name"]])
            value = str(path)
        elif item["name"] == "SIDECAR_SPOOL_PATH":
            value = str(workdir / "spool" / "spool.db")
        env[item["name"]] = value
    return env
