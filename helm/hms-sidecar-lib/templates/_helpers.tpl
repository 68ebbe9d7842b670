{{/*
Helpers of the hms-sidecar library chart. Every name carries the chart prefix,
because defined templates are global across a chart and its dependencies.

Calling convention of the public templates: pass either the root context (`.`),
which uses `.Values.sidecar` (the library declared with `alias: sidecar`), or a
dict for one of several workloads in a release:
  (dict "root" $ "values" $mergedSidecarValues "component" "orders")
`values` defaults to `.Values.sidecar`, `component` to "" (names then derive from
the release's fullname alone).
*/}}

{{/* Chart name, truncated to 63 characters. */}}
{{- define "hms-sidecar-lib.name" -}}
{{- default .Chart.Name (index .Values "nameOverride") | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release + chart), truncated to 63 characters. */}}
{{- define "hms-sidecar-lib.fullname" -}}
{{- $override := index .Values "fullnameOverride" }}
{{- if $override }}
{{- $override | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name (index .Values "nameOverride") }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version for the helm.sh/chart label. */}}
{{- define "hms-sidecar-lib.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the release (root context). */}}
{{- define "hms-sidecar-lib.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hms-sidecar-lib.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended labels (root context). */}}
{{- define "hms-sidecar-lib.labels" -}}
helm.sh/chart: {{ include "hms-sidecar-lib.chart" . }}
{{ include "hms-sidecar-lib.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Service account name (root context): serviceAccount.name, else fullname or "default". */}}
{{- define "hms-sidecar-lib.serviceAccountName" -}}
{{- $sa := index .Values "serviceAccount" | default dict }}
{{- if index $sa "create" }}
{{- default (include "hms-sidecar-lib.fullname" .) (index $sa "name") }}
{{- else }}
{{- default "default" (index $sa "name") }}
{{- end }}
{{- end }}

{{/*
Normalizes a call's argument. Usage:
  {{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
then $c.root, $c.v (the sidecar values), $c.component and $c.base (the object
name stem: fullname or fullname-component, at most 52 characters so that
suffixes such as "-sidecar" keep names within 63).
*/}}
{{- define "hms-sidecar-lib.args" -}}
{{- $in := .in }}
{{- $root := $in }}
{{- if hasKey $in "root" }}{{ $root = index $in "root" }}{{ end }}
{{- $v := index $root.Values "sidecar" | default (index $root.Values "hms-sidecar-lib") }}
{{- if and (hasKey $in "values") (index $in "values") }}{{ $v = index $in "values" }}{{ end }}
{{- if not $v }}
{{- fail "hms-sidecar-lib: no sidecar values: declare the library dependency with `alias: sidecar`, or pass (dict \"root\" $ \"values\" ...)" }}
{{- end }}
{{- $component := "" }}
{{- if hasKey $in "component" }}{{ $component = index $in "component" | default "" }}{{ end }}
{{- $base := include "hms-sidecar-lib.fullname" $root }}
{{- if $component }}
{{- $base = printf "%s-%s" ($base | trunc (sub 51 (len $component) | int) | trimSuffix "-") $component }}
{{- end }}
{{- $_ := set . "root" $root }}
{{- $_ = set . "v" $v }}
{{- $_ = set . "component" $component }}
{{- $_ = set . "base" ($base | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/* Whole seconds of a sidecar duration ("500ms", "20s", "1m30s", 10), rounded up. */}}
{{- define "hms-sidecar-lib.durationSeconds" -}}
{{- $d := . }}
{{- if kindIs "string" $d }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?$" $d }}
{{- ceil (float64 $d) | int }}
{{- else }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|h|m|s)" $d -1 }}
{{- $n := float64 (regexFind "^[0-9]+(\\.[0-9]+)?" .) }}
{{- $unit := regexFind "(ms|h|m|s)$" . }}
{{- $factor := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit }}
{{- $total = addf $total (mulf $n $factor) }}
{{- end }}
{{- ceil $total | int }}
{{- end }}
{{- else }}
{{- ceil (float64 $d) | int }}
{{- end }}
{{- end }}

{{/* Image reference: repository@digest, else repository:tag. Argument: the sidecar values. */}}
{{- define "hms-sidecar-lib.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository .image.tag }}
{{- end }}
{{- end }}

{{/* The ConfigMap's name. Argument: as the public templates. */}}
{{- define "hms-sidecar-lib.configMapName" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- printf "%s-sidecar" $c.base }}
{{- end }}

{{/*
Labels to add to a pod template that carries the sidecar: the PodMonitor selects
on them. Argument: as the public templates.
*/}}
{{- define "hms-sidecar-lib.podLabels" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- if $c.v.enabled -}}
sidecar.hms.io/injected: "true"
{{- end }}
{{- end }}

{{/*
Pod annotations: a checksum of the sidecar config (a config change rolls the
pods) and, with metrics.annotations, the prometheus.io scrape annotations.
*/}}
{{- define "hms-sidecar-lib.podAnnotations" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- if $c.v.enabled -}}
checksum/sidecar-config: {{ include "hms-sidecar-lib.configYaml" . | sha256sum }}
{{- if $c.v.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $c.v.ports.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
{{- end }}
