{{/*
The chart name, or nameOverride.
*/}}
{{- define "moe-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified name: fullnameOverride, else RELEASE-NAME (just RELEASE when it already
contains NAME). Truncated to 63 characters, the limit of a DNS label.
*/}}
{{- define "moe-operator.fullname" -}}
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

{{/*
chart-version, for the helm.sh/chart label.
*/}}
{{- define "moe-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "moe-operator.labels" -}}
helm.sh/chart: {{ include "moe-operator.chart" . }}
{{ include "moe-operator.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: moe-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable across upgrades (a Deployment's selector is immutable).
*/}}
{{- define "moe-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "moe-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository@digest, or repository:tag (tag defaults to appVersion).
*/}}
{{- define "moe-operator.image" -}}
{{- include "moe-operator.imageRef" (dict "image" .Values.image "root" .) }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: imageRegistry replaces the repository's
registry and path, a digest wins over the tag, the tag defaults to appVersion.
*/}}
{{- define "moe-operator.imageRef" -}}
{{- $repo := .image.repository }}
{{- with .root.Values.imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) (base $repo) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The worker image passed to the operator.
*/}}
{{- define "moe-operator.workerImage" -}}
{{- include "moe-operator.imageRef" (dict "image" .Values.workerImage "root" .) }}
{{- end }}

{{/*
The leader-election Lease: one per release, so two releases (say, one per watched namespace)
in the same namespace do not contend for one Lease.
*/}}
{{- define "moe-operator.leaseName" -}}
{{- include "moe-operator.fullname" . }}
{{- end }}

{{/*
Checks that hold across values; fail early with a message naming the value.
*/}}
{{- define "moe-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without it every replica reconciles at once" }}
{{- end }}
{{- end }}

{{/*
Non-empty when a ServiceMonitor may be rendered: the cluster serves
monitoring.coreos.com/v1 ServiceMonitor, or serviceMonitor.force is set.
*/}}
{{- define "moe-operator.serviceMonitorAPI" -}}
{{- if or .Values.serviceMonitor.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}
true
{{- end }}
{{- end }}

{{/*
Non-empty when a PrometheusRule may be rendered: the cluster serves
monitoring.coreos.com/v1 PrometheusRule, or prometheusRule.force is set.
*/}}
{{- define "moe-operator.prometheusRuleAPI" -}}
{{- if or .Values.prometheusRule.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") -}}
true
{{- end }}
{{- end }}
