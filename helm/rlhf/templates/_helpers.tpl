{{/* Names, labels and the pieces every pod shares. */}}

{{- define "rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlhf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<component>", kept under the 63-character name limit. */}}
{{- define "rlhf.componentName" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "rlhf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf
{{- end }}

{{- define "rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component; call with (dict "root" $ "component" "policy"). */}}
{{- define "rlhf.componentLabels" -}}
{{ include "rlhf.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rlhf.componentSelectorLabels" -}}
{{ include "rlhf.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlhf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "rlhf.registryClaim" -}}
{{- default (printf "%s-registry" (include "rlhf.fullname" .)) .Values.registry.existingClaim }}
{{- end }}

{{/*
Environment shared by every rlhf container: Kafka credentials (the bootstrap servers are in
the config file), the streams settings every component must agree on (rlhf/streams.py) and
writable cache locations, since the root filesystem is read-only.
*/}}
{{- define "rlhf.commonEnv" -}}
{{- if ne .Values.kafka.securityProtocol "PLAINTEXT" }}
- name: RLHF_KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- end }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- name: RLHF_KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.saslMechanism | quote }}
- name: RLHF_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.existingSecret }}
      key: {{ .Values.kafka.usernameKey }}
- name: RLHF_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.existingSecret }}
      key: {{ .Values.kafka.passwordKey }}
{{- end }}
- name: RLHF_STREAMS__TOPIC_PREFIX
  value: {{ .Values.streams.topicPrefix | quote }}
- name: RLHF_STREAMS__VALIDATION_FRACTION
  value: {{ .Values.streams.validationFraction | quote }}
- name: RLHF_STREAMS__TEST_FRACTION
  value: {{ .Values.streams.testFraction | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: TRITON_CACHE_DIR
  value: /tmp/.cache/triton
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rlhf.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "rlhf.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* The metrics port's pod annotations, for annotation-based Prometheus discovery. */}}
{{- define "rlhf.metricsAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
A component's config file (rlhf/config.py: YAML keys are the config dataclass fields): the
user's `<component>.config` with the settings the chart wires laid over it, so the file always
agrees with the container ports, the mounts and the Kafka values.
Call with (dict "root" $ "component" "policy").
*/}}
{{- define "rlhf.config" -}}
{{- $values := index .root.Values .component }}
{{- $wired := include (printf "rlhf.wired.%s" .component) .root | fromYaml }}
{{- toYaml (mustMergeOverwrite (deepCopy $values.config) $wired) }}
{{- end }}

{{/* rlhf.runtime.RuntimeConfig of a gRPC server. */}}
{{- define "rlhf.wired.runtime" -}}
runtime:
  # Pods are reached through their IP: every port binds all interfaces (the default is loopback).
  host: 0.0.0.0
  metrics_host: 0.0.0.0
  http_host: 0.0.0.0
  port: {{ .values.grpcPort }}
  metrics_port: {{ .values.metricsPort }}
  http_port: {{ if .values.http.enabled }}{{ .values.http.port }}{{ else }}-1{{ end }}
  http_cors_origins: {{ .values.http.corsOrigins | default list | toJson }}
  # Drain in-flight calls, then leave the stop hooks (Kafka flush) time before SIGKILL.
  grace_s: {{ max 1 (sub .root.Values.terminationGracePeriodSeconds 15) }}
  {{- if .root.Values.auth.existingSecret }}
  api_keys_file: {{ printf "%s/%s" .root.Values.auth.mountPath .root.Values.auth.key }}
  require_auth: true
  {{- end }}
  {{- with .root.Values.tls }}
  {{- if .existingSecret }}
  tls:
    cert_file: {{ printf "%s/tls.crt" .mountPath }}
    key_file: {{ printf "%s/tls.key" .mountPath }}
    {{- if ne .clientAuth "none" }}
    client_ca_file: {{ printf "%s/ca.crt" .mountPath }}
    require_client_cert: {{ eq .clientAuth "require" }}
    {{- end }}
  {{- end }}
  {{- end }}
{{- end }}

{{- define "rlhf.wired.policy" -}}
{{ include "rlhf.wired.runtime" (dict "root" . "values" .Values.policy) }}
model:
  registry: {{ .Values.registry.mountPath }}
# The models topic decides what is served (promotions, rollbacks, rejections) and carries
# AdminService's changes; without it a rolled-back version could come back.
follow:
  bootstrap_servers: {{ .Values.kafka.bootstrapServers | quote }}
publish:
  bootstrap_servers: {{ .Values.kafka.bootstrapServers | quote }}
{{- end }}

{{- define "rlhf.wired.reward" -}}
{{ include "rlhf.wired.runtime" (dict "root" . "values" .Values.reward) }}
model:
  registry: {{ .Values.registry.mountPath }}
follow:
  bootstrap_servers: {{ .Values.kafka.bootstrapServers | quote }}
{{- end }}

{{- define "rlhf.wired.feedback" -}}
{{ include "rlhf.wired.runtime" (dict "root" . "values" .Values.feedback) }}
kafka:
  bootstrap_servers: {{ .Values.kafka.bootstrapServers | quote }}
{{- end }}

{{- define "rlhf.wired.trainer" -}}
bootstrap_servers: {{ .Values.kafka.bootstrapServers | quote }}
registry: {{ .Values.registry.mountPath }}
metrics_port: {{ .Values.trainer.metricsPort }}
{{- end }}
