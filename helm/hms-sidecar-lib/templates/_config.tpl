{{/*
The sidecar's config file (docs/configuration.md) from `config`, with the keys the
chart owns set from the other values: `listen` and `admin.listen` from `ports`,
`consul.enabled`/`mode`/`address` from `consul`, and `service.name` defaulting to
the component (or the release's fullname). Env vars the pod sets on top (they win
over the file): SIDECAR_SERVICE_ADDRESS (pod IP), SIDECAR_SPOOL_PATH, CONSUL_HTTP_ADDR
in agent mode (host IP), SIDECAR_CONSUL_NODE in catalog mode (pod name), the *_FILE
secrets and OTEL_*.
*/}}
{{- define "hms-sidecar-lib.configYaml" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- $cfg := deepCopy ($v.config | default dict) }}
{{- range $key := list "listen" "admin" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "sidecar.config.%s: set by the chart from sidecar.ports; remove it" $key) }}
{{- end }}
{{- end }}
{{- $service := index $cfg "service" | default dict }}
{{- if not (index $service "name") }}
{{- $_ := set $service "name" (default $c.base $c.component) }}
{{- end }}
{{- $_ := set $cfg "service" $service }}
{{- $_ = set $cfg "listen" (printf "127.0.0.1:%d" ($v.ports.app | int)) }}
{{- $_ = set $cfg "admin" (dict "listen" (printf "0.0.0.0:%d" ($v.ports.admin | int))) }}
{{- $consul := index $cfg "consul" | default dict }}
{{- if hasKey $consul "token" }}
{{- fail "sidecar.config.consul.token: secrets do not belong in the ConfigMap; use sidecar.consul.tokenSecret" }}
{{- end }}
{{- $_ = set $consul "enabled" $v.consul.enabled }}
{{- if $v.consul.enabled }}
{{- $_ = set $consul "mode" $v.consul.mode }}
{{- if eq $v.consul.mode "catalog" }}
{{- $_ = set $consul "address" $v.consul.address }}
{{- end }}
{{- end }}
{{- $_ = set $cfg "consul" $consul }}
{{- with index $cfg "events" }}
{{- if hasKey . "amqp_url" }}
{{- fail "sidecar.config.events.amqp_url: the URL holds a password; use sidecar.events.amqpUrlSecret (mounted as a file)" }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The ConfigMap holding sidecar.yaml. Argument: as the public templates. */}}
{{- define "hms-sidecar-lib.configMap" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- if $c.v.enabled -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "hms-sidecar-lib.configMapName" . }}
  labels:
    {{- include "hms-sidecar-lib.labels" $c.root | nindent 4 }}
    {{- with $c.component }}
    app.kubernetes.io/component: {{ . }}
    {{- end }}
data:
  sidecar.yaml: |
    {{- include "hms-sidecar-lib.configYaml" . | nindent 4 }}
{{- end }}
{{- end }}
