{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "statehouse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "statehouse.fullname" -}}
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

{{- define "statehouse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object of the release, without the component. */}}
{{- define "statehouse.commonLabels" -}}
helm.sh/chart: {{ include "statehouse.chart" . }}
app.kubernetes.io/name: {{ include "statehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: statehouse
{{- end }}

{{/* Labels of the server's objects. */}}
{{- define "statehouse.labels" -}}
{{ include "statehouse.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "statehouse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "statehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "statehouse.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "statehouse.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "statehouse.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding TURSO_TOKEN and the R2 keys, if any. */}}
{{- define "statehouse.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "statehouse.fullname" .) }}
{{- end }}

{{/* "true" when the chart creates its own Secret (some secret value given, no existingSecret). */}}
{{- define "statehouse.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.tursoToken .Values.secrets.r2AccessKeyId .Values.secrets.r2SecretAccessKey) -}}
true
{{- end }}
{{- end }}

{{- define "statehouse.libsql.fullname" -}}
{{- printf "%s-libsql" (include "statehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "statehouse.libsql.labels" -}}
{{ include "statehouse.commonLabels" . }}
app.kubernetes.io/component: libsql
{{- end }}

{{- define "statehouse.libsql.selectorLabels" -}}
app.kubernetes.io/name: {{ include "statehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: libsql
{{- end }}

{{/* The TURSO_URL the server uses: config.tursoUrl, else the development libSQL server. */}}
{{- define "statehouse.tursoUrl" -}}
{{- if .Values.config.tursoUrl }}
{{- .Values.config.tursoUrl }}
{{- else if .Values.libsql.enabled }}
{{- printf "http://%s:8080" (include "statehouse.libsql.fullname" .) }}
{{- else }}
{{- fail "statehouse: set config.tursoUrl (libsql://... or http(s)://...), or libsql.enabled=true for a development libSQL server" }}
{{- end }}
{{- end }}
