{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "sd35-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: fullnameOverride, else the release name when it already contains the chart
name, else "<release>-<chart>". Truncated to 63 characters (the DNS label limit).
*/}}
{{- define "sd35-operator.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "sd35-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "sd35-operator.labels" -}}
helm.sh/chart: {{ include "sd35-operator.chart" . }}
{{ include "sd35-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sd35-operator
{{- end }}

{{/* Labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "sd35-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sd35-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "sd35-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sd35-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "sd35-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The operator image. */}}
{{- define "sd35-operator.image" -}}
{{- include "sd35-operator.imageRef" (list .Values.image .) }}
{{- end }}

{{/* The default sd35-server image. */}}
{{- define "sd35-operator.serverImage" -}}
{{- include "sd35-operator.imageRef" (list .Values.serverImage .) }}
{{- end }}

{{/* "true" when the replicas elect a leader: asked for, or more than one replica. */}}
{{- define "sd35-operator.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) }}true{{ end }}
{{- end }}

{{/* Name of the leader election Lease: one per release, so releases never contend. */}}
{{- define "sd35-operator.leaseName" -}}
{{- include "sd35-operator.fullname" . }}
{{- end }}

{{/*
The operator's rules: what it does with the API and nothing more (operator/src/main.rs,
reconcile.rs, apply.rs). Children are written with server-side apply, which needs create as
well as patch when the object does not exist yet.
*/}}
{{- define "sd35-operator.rules" }}
# Watch SD35Deployments; write their status with server-side apply.
- apiGroups: ["sd35.io"]
  resources: ["sd35deployments"]
  verbs: ["list", "watch"]
- apiGroups: ["sd35.io"]
  resources: ["sd35deployments/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion need this where the
# OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift, hardened clusters).
- apiGroups: ["sd35.io"]
  resources: ["sd35deployments/finalizers"]
  verbs: ["update"]
# The weight cache: created once, then annotated (cache complete, engine built), given
# owner references and grown (spec.cache.size) by merge patch.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Fetch and build Jobs; a failed one is deleted when the spec changes, to retry.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The serving Deployment (always wanted), and its Service, PodDisruptionBudget,
# NetworkPolicy and ServiceMonitor (Prometheus Operator): one sweep by label and owner
# deletes those the spec no longer wants.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Serving pods and the pods of fetch and build Jobs, read only: a server that exits with a
# documented code (no usable GPU, an engine that is not what was asked for), or a Job whose
# attempt failed (a 404 from the source, a full volume), becomes a condition that quotes its
# termination message.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events for every transition (a repeated event is patched with a new count).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
