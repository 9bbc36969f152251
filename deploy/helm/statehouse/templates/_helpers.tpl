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

{{/* Name of the Secret holding TURSO_TOKEN, the R2 keys and the auth secrets, if any. */}}
{{- define "statehouse.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "statehouse.fullname" .) }}
{{- end }}

{{/* "true" when a JWT key is configured in the values (HS256 secret or a JWKS mount). */}}
{{- define "statehouse.jwtKey" -}}
{{- with .Values.auth.jwt -}}
{{- if or .hs256Secret .jwks.configMap .jwks.secret -}}
true
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when some credential source is configured: in the values, or (unseen) in an existingSecret. */}}
{{- define "statehouse.authConfigured" -}}
{{- if or .Values.auth.tokens .Values.auth.tokensFile.secretName (include "statehouse.jwtKey" .) .Values.secrets.existingSecret -}}
true
{{- end }}
{{- end }}

{{/* "true" when the chart's own Secret must carry STATEHOUSE_PEER_SECRET. */}}
{{- define "statehouse.chartPeerSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or (include "statehouse.authConfigured" .) .Values.auth.peerSecret) -}}
true
{{- end }}
{{- end }}

{{/* "true" when the chart creates its own Secret (some secret value given, no existingSecret). */}}
{{- define "statehouse.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.tursoToken .Values.secrets.r2AccessKeyId .Values.secrets.r2SecretAccessKey .Values.auth.tokens .Values.auth.jwt.hs256Secret (include "statehouse.chartPeerSecret" .)) -}}
true
{{- end }}
{{- end }}

{{/*
STATEHOUSE_PEER_SECRET for the chart's Secret: auth.peerSecret; else the value the
release's Secret already holds (so upgrades keep it and every pod, old or new, agrees);
else 48 fresh random characters. `lookup` sees nothing under `helm template`.
*/}}
{{- define "statehouse.peerSecret" -}}
{{- if .Values.auth.peerSecret }}
{{- .Values.auth.peerSecret }}
{{- else }}
{{- $current := lookup "v1" "Secret" .Release.Namespace (include "statehouse.fullname" .) }}
{{- $kept := dig "data" .Values.secrets.keys.peerSecret "" $current }}
{{- if $kept }}
{{- $kept | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checksum of what the chart's Secret is made of, for the pod annotation that rolls the
pods when a secret value changes. Taken over the values rather than the rendered
Secret: a generated peer secret would make it differ on every render (the Deployment's
render and the Secret's each draw one on a fresh install), and once generated it never
changes anyway.
*/}}
{{- define "statehouse.secretChecksum" -}}
{{- $auth := pick .Values.auth "tokens" "peerSecret" "jwt" }}
{{- dict "secrets" .Values.secrets "auth" $auth "peer" (include "statehouse.chartPeerSecret" .) "create" (include "statehouse.createSecret" .) | toJson | sha256sum }}
{{- end }}

{{/* Where the mounted token file and JWKS document appear in the container. */}}
{{- define "statehouse.authFilePath" -}}
/etc/statehouse/auth/tokens
{{- end }}
{{- define "statehouse.jwksFilePath" -}}
/etc/statehouse/jwks/jwks.json
{{- end }}

{{/* Refuses value combinations the server would refuse at start, with what to set instead. */}}
{{- define "statehouse.validateAccess" -}}
{{- $auth := .Values.auth }}
{{- if and (not (include "statehouse.authConfigured" .)) (not $auth.insecure) }}
{{- fail "statehouse: no authentication is configured, and the server refuses to serve 0.0.0.0 without it. Set auth.tokens to token lines from `statehouse token --name <name> --namespaces <patterns> --rights <rights>` (e.g. --set-json 'auth.tokens=[\"<line>\"]'), or auth.tokensFile.secretName, or auth.jwt (hs256Secret or jwks, with audience and issuer), or secrets.existingSecret holding STATEHOUSE_AUTH_TOKENS and STATEHOUSE_PEER_SECRET. Only for a throwaway development install: auth.insecure=true." }}
{{- end }}
{{- if .Values.secrets.existingSecret }}
{{- if or $auth.tokens $auth.peerSecret $auth.jwt.hs256Secret }}
{{- fail (printf "statehouse: with secrets.existingSecret (%s) the chart creates no Secret, so auth.tokens, auth.peerSecret and auth.jwt.hs256Secret cannot be stored: put them into %s as %s, %s and %s" .Values.secrets.existingSecret .Values.secrets.existingSecret .Values.secrets.keys.authTokens .Values.secrets.keys.peerSecret .Values.secrets.keys.jwtHs256Secret) }}
{{- end }}
{{- end }}
{{- if and $auth.jwt.jwks.configMap $auth.jwt.jwks.secret }}
{{- fail "statehouse: set one of auth.jwt.jwks.configMap and auth.jwt.jwks.secret, not both" }}
{{- end }}
{{- if include "statehouse.jwtKey" . }}
{{- if not (and $auth.jwt.audience $auth.jwt.issuer) }}
{{- fail "statehouse: JWTs are accepted (auth.jwt.hs256Secret or auth.jwt.jwks), so auth.jwt.audience and auth.jwt.issuer must both be set: without them a token your identity provider issued for another service would work here" }}
{{- end }}
{{- else if and (or $auth.jwt.audience $auth.jwt.issuer) (not .Values.secrets.existingSecret) }}
{{- fail "statehouse: auth.jwt.audience / auth.jwt.issuer are set but no JWT key is: set auth.jwt.hs256Secret or auth.jwt.jwks" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not $auth.insecure) (not .Values.serviceMonitor.bearerTokenSecret.name) }}
{{- fail "statehouse: serviceMonitor.enabled needs serviceMonitor.bearerTokenSecret.name: /metrics answers only a bearer token with the admin right. Create a Secret in the ServiceMonitor's namespace holding a token from `statehouse token --name prometheus --namespaces '*' --rights admin` (its line goes into auth.tokens)" }}
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
