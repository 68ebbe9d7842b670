{{/*
The sidecar container and what the pod needs for it. Arguments: the root context,
or (dict "root" $ "values" $sidecarValues "component" "name"); see _helpers.tpl.

A pod template that uses them:
  metadata:
    labels: {{ include "hms-sidecar-lib.podLabels" . | nindent 8 }}
    annotations: {{ include "hms-sidecar-lib.podAnnotations" . | nindent 8 }}
  spec:
    securityContext: {{ include "hms-sidecar-lib.podSecurityContext" . | nindent 8 }}
    terminationGracePeriodSeconds: {{ include "hms-sidecar-lib.terminationGracePeriodSeconds" . }}
    initContainers: {{ include "hms-sidecar-lib.initContainers" . | nindent 8 }}
    containers: {{ include "hms-sidecar-lib.containers" . | nindent 8 }}
      - name: app ...
    volumes: {{ include "hms-sidecar-lib.volumes" . | nindent 8 }}
*/}}

{{- define "hms-sidecar-lib.secretsDir" -}}/var/run/secrets/hms-sidecar{{- end }}

{{/* The sidecar's securityContext: the restricted Pod Security profile and a read-only root. */}}
{{- define "hms-sidecar-lib.containerSecurityContext" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ $c.v.securityContext.runAsUser }}
runAsGroup: {{ $c.v.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A pod securityContext meeting the restricted profile; fsGroup makes the spool volume writable. */}}
{{- define "hms-sidecar-lib.podSecurityContext" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c -}}
runAsNonRoot: true
runAsUser: {{ $c.v.securityContext.runAsUser }}
runAsGroup: {{ $c.v.securityContext.runAsGroup }}
fsGroup: {{ $c.v.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The sidecar's environment: pod facts from the downward API, secrets as *_FILE paths, OTEL_*. */}}
{{- define "hms-sidecar-lib.env" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- $secrets := include "hms-sidecar-lib.secretsDir" . -}}
- name: SIDECAR_CONFIG
  value: /etc/sidecar/sidecar.yaml
- name: SIDECAR_SPOOL_PATH
  value: {{ printf "%s/spool.db" (trimSuffix "/" $v.spool.mountPath) | quote }}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: SIDECAR_SERVICE_ADDRESS
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
{{- if $v.consul.enabled }}
{{- if eq $v.consul.mode "agent" }}
- name: HOST_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
- name: CONSUL_HTTP_ADDR
  value: {{ printf "%s://$(HOST_IP):%d" $v.consul.agentScheme ($v.consul.agentPort | int) | quote }}
{{- else }}
- name: SIDECAR_CONSUL_NODE
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- end }}
{{- if $v.consul.tokenSecret.name }}
- name: CONSUL_HTTP_TOKEN_FILE
  value: {{ printf "%s/consul-token/%s" $secrets $v.consul.tokenSecret.key | quote }}
{{- end }}
{{- if $v.consul.caSecret.name }}
- name: CONSUL_CACERT
  value: {{ printf "%s/consul-ca/%s" $secrets $v.consul.caSecret.key | quote }}
{{- end }}
{{- end }}
{{- if $v.events.amqpUrlSecret.name }}
- name: SIDECAR_AMQP_URL_FILE
  value: {{ printf "%s/amqp/%s" $secrets $v.events.amqpUrlSecret.key | quote }}
{{- end }}
{{- with $v.tracing.otlpEndpoint }}
{{- $service := (include "hms-sidecar-lib.configYaml" $c.in | fromYaml).service.name }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" }}
{{- range $key, $value := $v.tracing.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $key (toString $value)) }}
{{- end }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.tracing.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $service | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.tracing.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.tracing.samplerArg | toString | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- range $v.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(TOKEN|PASSWORD|SECRET|AMQP_URL|OTLP(_TRACES)?_HEADERS)$" .name) }}
{{- fail (printf "sidecar.extraEnv %s: a secret must not be an env value; take it from a Secret (valueFrom.secretKeyRef) or use the chart's *Secret settings (mounted as files)" .name) }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "hms-sidecar-lib.volumeMounts" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- $secrets := include "hms-sidecar-lib.secretsDir" . -}}
- name: sidecar-config
  mountPath: /etc/sidecar
  readOnly: true
- name: sidecar-tmp
  mountPath: /tmp
- name: sidecar-spool
  mountPath: {{ $v.spool.mountPath }}
{{- if and $v.consul.enabled $v.consul.tokenSecret.name }}
- name: sidecar-consul-token
  mountPath: {{ $secrets }}/consul-token
  readOnly: true
{{- end }}
{{- if and $v.consul.enabled $v.consul.caSecret.name }}
- name: sidecar-consul-ca
  mountPath: {{ $secrets }}/consul-ca
  readOnly: true
{{- end }}
{{- if $v.events.amqpUrlSecret.name }}
- name: sidecar-amqp
  mountPath: {{ $secrets }}/amqp
  readOnly: true
{{- end }}
{{- with $v.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The python one-liner a hook runs (the image has no curl): GET until 2xx or the deadline. */}}
{{- define "hms-sidecar-lib.waitReadyScript" -}}
import sys, time, urllib.request
deadline = time.monotonic() + {{ .timeout }}
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:{{ .port }}/ready", timeout=1)
        sys.exit(0)
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("sidecar not ready after {{ .timeout }}s")
        time.sleep(0.5)
{{- end }}

{{/* The sidecar container, as one list item. */}}
{{- define "hms-sidecar-lib.container" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if not (has $v.mode (list "native" "legacy")) }}
{{- fail (printf "sidecar.mode: expected native or legacy, got %v" $v.mode) }}
{{- end }}
{{- if and (eq $v.mode "native") (semverCompare "<1.29.0-0" $c.root.Capabilities.KubeVersion.Version) }}
{{- fail (printf "sidecar.mode native needs Kubernetes >= 1.29 (native sidecar containers); this cluster is %s: set sidecar.mode: legacy" $c.root.Capabilities.KubeVersion.Version) }}
{{- end -}}
- name: sidecar
  image: {{ include "hms-sidecar-lib.image" $v | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: [run]
  {{- if eq $v.mode "native" }}
  restartPolicy: Always
  {{- end }}
  ports:
    - name: sidecar-admin
      containerPort: {{ $v.ports.admin }}
      protocol: TCP
  env:
    {{- include "hms-sidecar-lib.env" $c.in | nindent 4 }}
  volumeMounts:
    {{- include "hms-sidecar-lib.volumeMounts" $c.in | nindent 4 }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- include "hms-sidecar-lib.containerSecurityContext" $c.in | nindent 4 }}
  startupProbe:
    httpGet: {path: /ready, port: {{ $v.ports.admin }}}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
    timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
  readinessProbe:
    httpGet: {path: /ready, port: {{ $v.ports.admin }}}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
    timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
  livenessProbe:
    httpGet: {path: /live, port: {{ $v.ports.admin }}}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
    timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
  {{- if eq $v.mode "legacy" }}
  lifecycle:
    # The kubelet starts the next container only once this hook returns: the app
    # starts with the sidecar ready (Istio's holdApplicationUntilProxyStarts).
    postStart:
      exec:
        command:
          - {{ $v.legacy.python }}
          - -c
          - |
            {{- include "hms-sidecar-lib.waitReadyScript" (dict "port" $v.ports.admin "timeout" $v.legacy.waitTimeoutSeconds) | nindent 12 }}
    {{- if gt ($v.legacy.preStopSleepSeconds | int) 0 }}
    preStop:
      exec:
        command: [{{ $v.legacy.python | quote }}, "-c", "import time; time.sleep({{ $v.legacy.preStopSleepSeconds | int }})"]
    {{- end }}
  {{- end }}
{{- end }}

{{/* Native mode: the sidecar for `initContainers` (nothing in legacy mode or when disabled). */}}
{{- define "hms-sidecar-lib.initContainers" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- if and $c.v.enabled (eq $c.v.mode "native") }}
{{- include "hms-sidecar-lib.container" . }}
{{- end }}
{{- end }}

{{/* Legacy mode: the sidecar for the top of `containers` (nothing in native mode or when disabled). */}}
{{- define "hms-sidecar-lib.containers" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- if and $c.v.enabled (ne $c.v.mode "native") }}
{{- include "hms-sidecar-lib.container" . }}
{{- end }}
{{- end }}

{{/* The sidecar's volumes, as list items: config, /tmp, spool and the mounted Secrets. */}}
{{- define "hms-sidecar-lib.volumes" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if $v.enabled -}}
- name: sidecar-config
  configMap:
    name: {{ include "hms-sidecar-lib.configMapName" . }}
- name: sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if eq $v.spool.type "emptyDir" }}
- name: sidecar-spool
  emptyDir:
    sizeLimit: {{ $v.spool.sizeLimit }}
{{- else if eq $v.spool.type "existingClaim" }}
{{- if not $v.spool.existingClaim }}
{{- fail "sidecar.spool.existingClaim: required with sidecar.spool.type existingClaim" }}
{{- end }}
- name: sidecar-spool
  persistentVolumeClaim:
    claimName: {{ $v.spool.existingClaim }}
{{- else if ne $v.spool.type "volumeClaimTemplate" }}
{{- fail (printf "sidecar.spool.type: expected emptyDir, existingClaim or volumeClaimTemplate, got %v" $v.spool.type) }}
{{- end }}
{{- if and $v.consul.enabled $v.consul.tokenSecret.name }}
- name: sidecar-consul-token
  secret:
    secretName: {{ $v.consul.tokenSecret.name }}
    defaultMode: 0440
    items:
      - {key: {{ $v.consul.tokenSecret.key | quote }}, path: {{ $v.consul.tokenSecret.key | quote }}}
{{- end }}
{{- if and $v.consul.enabled $v.consul.caSecret.name }}
- name: sidecar-consul-ca
  secret:
    secretName: {{ $v.consul.caSecret.name }}
    defaultMode: 0440
    items:
      - {key: {{ $v.consul.caSecret.key | quote }}, path: {{ $v.consul.caSecret.key | quote }}}
{{- end }}
{{- if $v.events.amqpUrlSecret.name }}
- name: sidecar-amqp
  secret:
    secretName: {{ $v.events.amqpUrlSecret.name }}
    defaultMode: 0440
    items:
      - {key: {{ $v.events.amqpUrlSecret.key | quote }}, path: {{ $v.events.amqpUrlSecret.key | quote }}}
{{- end }}
{{- end }}
{{- end }}

{{/* For a StatefulSet's volumeClaimTemplates with spool.type volumeClaimTemplate: one spool per pod. */}}
{{- define "hms-sidecar-lib.volumeClaimTemplate" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if and $v.enabled (eq $v.spool.type "volumeClaimTemplate") -}}
- metadata:
    name: sidecar-spool
  spec:
    accessModes: [ReadWriteOnce]
    {{- with $v.spool.storageClassName }}
    storageClassName: {{ . }}
    {{- end }}
    resources:
      requests:
        storage: {{ $v.spool.sizeLimit }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: at least what the stop needs. The sidecar's own stop
takes drain + grace at most (grace is counted from SIGTERM, so this bound keeps the
drain as a margin). Native: the app stops first (appShutdownSeconds), then the
sidecar gets SIGTERM. Legacy: everything gets SIGTERM at once (the sidecar after
its optional preStop sleep), so the larger of the two. Unset: that plus 5 s; an
explicit value below it fails the render.
*/}}
{{- define "hms-sidecar-lib.terminationGracePeriodSeconds" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c }}
{{- $v := $c.v }}
{{- if not $v.enabled }}
{{- $v.terminationGracePeriodSeconds | default 30 }}
{{- else }}
{{- $shutdown := index ($v.config | default dict) "shutdown" | default dict }}
{{- $grace := include "hms-sidecar-lib.durationSeconds" (index $shutdown "grace" | default "20s") | int }}
{{- $drain := include "hms-sidecar-lib.durationSeconds" (index $shutdown "drain" | default "5s") | int }}
{{- $app := $v.appShutdownSeconds | int }}
{{- $sidecar := add $drain $grace }}
{{- $need := add $app $sidecar }}
{{- if eq $v.mode "legacy" }}
{{- $need = max $app (add ($v.legacy.preStopSleepSeconds | int) $sidecar) }}
{{- end }}
{{- if kindIs "invalid" $v.terminationGracePeriodSeconds }}
{{- add $need 5 }}
{{- else if lt ($v.terminationGracePeriodSeconds | int) ($need | int) }}
{{- fail (printf "sidecar.terminationGracePeriodSeconds: %v is below the %ds the stop needs (%s mode: appShutdownSeconds %d, shutdown.drain + grace %ds)" $v.terminationGracePeriodSeconds $need $v.mode $app $sidecar) }}
{{- else }}
{{- $v.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}
{{- end }}

{{/* Env for the app container: where its sidecar answers. */}}
{{- define "hms-sidecar-lib.appEnv" -}}
{{- $c := dict "in" . }}{{- include "hms-sidecar-lib.args" $c -}}
- name: SIDECAR_URL
  value: {{ printf "http://127.0.0.1:%d" ($c.v.ports.app | int) | quote }}
- name: SIDECAR_ADMIN_URL
  value: {{ printf "http://127.0.0.1:%d" ($c.v.ports.admin | int) | quote }}
{{- end }}
