{{/* Events are on with the in-cluster RabbitMQ or an existing Secret holding the URL. */}}
{{- define "hms-sidecar-demo.eventsEnabled" -}}
{{- if or .Values.rabbitmq.enabled .Values.sidecar.events.amqpUrlSecret.name }}true{{ end }}
{{- end }}

{{/* Name stem of a component's objects (fullname-component, within 63 characters). */}}
{{- define "hms-sidecar-demo.name" -}}
{{- printf "%s-%s" (include "hms-sidecar-lib.fullname" .root | trunc (sub 51 (len .component) | int) | trimSuffix "-") .component }}
{{- end }}

{{- define "hms-sidecar-demo.selectorLabels" -}}
{{ include "hms-sidecar-lib.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "hms-sidecar-demo.labels" -}}
{{ include "hms-sidecar-lib.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The sidecar values of one workload: `sidecar` with the workload's overrides merged
over it, plus what the demo wires up: its RabbitMQ Secret, its Jaeger, static
endpoints through the Kubernetes Services while Consul is off. Mutates its
argument: (dict "root" $ "component" "orders" "overrides" ... "events" ...) gets
"values" and "args" (the argument of the library's templates).
*/}}
{{- define "hms-sidecar-demo.sidecarValues" -}}
{{- $root := .root }}
{{- $v := mergeOverwrite (deepCopy $root.Values.sidecar) (deepCopy (.overrides | default dict)) }}
{{- if and $root.Values.rabbitmq.enabled (not $v.events.amqpUrlSecret.name) }}
{{- $_ := set $v.events "amqpUrlSecret" (dict "name" (include "hms-sidecar-demo.name" (dict "root" $root "component" "amqp")) "key" "url") }}
{{- end }}
{{- if and $root.Values.jaeger.enabled (not $v.tracing.otlpEndpoint) }}
{{- $_ := set $v.tracing "otlpEndpoint" (printf "http://%s:4318" (include "hms-sidecar-demo.name" (dict "root" $root "component" "jaeger"))) }}
{{- end }}
{{- if and (include "hms-sidecar-demo.eventsEnabled" $root) .events }}
{{- $_ := set $v.config "events" (deepCopy .events) }}
{{- end }}
{{- if not $v.consul.enabled }}
{{- range $name, $upstream := ($v.config.upstreams | default dict) }}
{{- if and (eq $name "billing") (not (index $upstream "endpoints")) }}
{{- $_ := set $upstream "endpoints" (list (printf "%s:80" (include "hms-sidecar-demo.name" (dict "root" $root "component" "billing")))) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set . "values" $v }}
{{- $_ = set . "args" (dict "root" $root "values" $v "component" .component) }}
{{- end }}

{{/* Restricted securityContext of the demo's own app containers. */}}
{{- define "hms-sidecar-demo.appSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
readOnlyRootFilesystem: true
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end }}
