{{/*
Prometheus Operator objects, each gated on its values flag AND on the cluster
serving monitoring.coreos.com/v1 (no CRD: nothing is rendered, so an install never
fails on a missing kind). Argument: the root context (one object per release:
the PodMonitor selects every pod of the release labelled by hms-sidecar-lib.podLabels).
*/}}
{{- define "hms-sidecar-lib.monitoringApiAvailable" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{- define "hms-sidecar-lib.podMonitor" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if and $v.enabled $v.metrics.podMonitor.enabled (include "hms-sidecar-lib.monitoringApiAvailable" $c.root) -}}
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata:
  name: {{ printf "%s-sidecar" $c.base }}
  labels:
    {{- include "hms-sidecar-lib.labels" $c.root | nindent 4 }}
    {{- with $v.metrics.podMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $c.root.Release.Name | trunc 63 | trimSuffix "-" }}
      sidecar.hms.io/injected: "true"
  podMetricsEndpoints:
    - port: sidecar-admin
      path: /metrics
      interval: {{ $v.metrics.podMonitor.interval }}
{{- end }}
{{- end }}

{{- define "hms-sidecar-lib.prometheusRule" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if and $v.enabled $v.metrics.prometheusRule.enabled (include "hms-sidecar-lib.monitoringApiAvailable" $c.root) }}
{{- /* The library's own files: a template runs with the consumer's .Files, so reach
the library through .Subcharts (its alias "sidecar", else its name). */ -}}
{{- $lib := index $c.root.Subcharts "sidecar" | default (index $c.root.Subcharts "hms-sidecar-lib") }}
{{- $rules := $lib.Files.Get "files/sidecar-alerts.rules.yml" | fromYaml }}
{{- if not $rules.groups }}
{{- fail "hms-sidecar-lib: files/sidecar-alerts.rules.yml not found in the library chart" }}
{{- end }}
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ printf "%s-sidecar" $c.base }}
  labels:
    {{- include "hms-sidecar-lib.labels" $c.root | nindent 4 }}
    {{- with $v.metrics.prometheusRule.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  groups:
    {{- toYaml $rules.groups | nindent 4 }}
{{- end }}
{{- end }}

{{/*
A `helm test` hook pod that checks each sidecar's /ready and /metrics over the
admin port (which listens on 0.0.0.0). Argument:
  (dict "root" $ "targets" (list "host:port" ...) "image" "curlimages/curl:8.11.1")
*/}}
{{- define "hms-sidecar-lib.testPod" -}}
{{- $root := .root }}
{{- $v := index $root.Values "sidecar" -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ printf "%s-sidecar-test" (include "hms-sidecar-lib.fullname" $root | trunc 50 | trimSuffix "-") }}
  labels:
    {{- include "hms-sidecar-lib.labels" $root | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    {{- include "hms-sidecar-lib.podSecurityContext" $root | nindent 4 }}
  containers:
    - name: check-sidecars
      image: {{ .image | quote }}
      command: [sh, -ec]
      args:
        - |
          for target in {{ join " " .targets }}; do
            echo "== $target"
            curl -fsS --max-time 5 --retry 10 --retry-delay 3 --retry-all-errors "http://$target/ready"
            echo
            curl -fsS --max-time 5 "http://$target/metrics" | grep '^sidecar_build_info'
          done
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {memory: 64Mi}
      securityContext:
        {{- include "hms-sidecar-lib.containerSecurityContext" $root | nindent 8 }}
{{- end }}

{{/* Text for a consumer's NOTES.txt: how to check the sidecar. Argument: as the public templates. */}}
{{- define "hms-sidecar-lib.notes" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if $v.enabled -}}
Sidecar ({{ $v.mode }} mode, image {{ include "hms-sidecar-lib.image" $v }}):
  app -> sidecar:   http://127.0.0.1:{{ $v.ports.app }} inside the pod (e.g. /v1/invoke/<upstream>/...)
  readiness:        kubectl -n {{ $c.root.Release.Namespace }} port-forward pod/<pod> {{ $v.ports.admin }} && curl localhost:{{ $v.ports.admin }}/ready
  status, metrics:  http://<pod IP>:{{ $v.ports.admin }}/v1/status and /metrics
  {{- if $v.consul.enabled }}
  Consul:           {{ $v.consul.mode }} mode{{ if eq $v.consul.mode "catalog" }} ({{ $v.consul.address }}){{ else }} (the agent on the node's host IP){{ end }}
  {{- else }}
  Consul:           off (static upstream endpoints)
  {{- end }}
  traces:           {{ $v.tracing.otlpEndpoint | default "off (set sidecar.tracing.otlpEndpoint)" }}
  events:           {{ if $v.events.amqpUrlSecret.name }}RabbitMQ URL from Secret {{ $v.events.amqpUrlSecret.name }}{{ else }}off (set sidecar.events.amqpUrlSecret){{ end }}; spool on {{ $v.spool.type }}
{{- end }}
{{- end }}
