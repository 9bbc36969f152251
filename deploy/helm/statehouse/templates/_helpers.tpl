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

{{/* Name of the Secret holding TURSO_TOKEN, the R2 keys, the Iceberg reader keys and the auth secrets, if any. */}}
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

{{/*
"true" when the chart makes the credential itself: no credential source is
configured and auth.insecure is false. `helm install` then generates an admin
token into the chart's Secret (key admin-token, with its line in
STATEHOUSE_AUTH_TOKENS), and every later render keeps it.
*/}}
{{- define "statehouse.generatedAdmin" -}}
{{- if and (not (include "statehouse.authConfigured" .)) (not .Values.auth.insecure) -}}
true
{{- end }}
{{- end }}

{{/* The key of the generated admin token in the chart's Secret (not an environment variable). */}}
{{- define "statehouse.adminTokenKey" -}}
admin-token
{{- end }}

{{/* "true" when the chart's own Secret must carry STATEHOUSE_PEER_SECRET. */}}
{{- define "statehouse.chartPeerSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or (include "statehouse.authConfigured" .) .Values.auth.peerSecret (include "statehouse.generatedAdmin" .)) -}}
true
{{- end }}
{{- end }}

{{/* "true" when the chart's own Secret must carry R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY. */}}
{{- define "statehouse.chartR2Keys" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.r2AccessKeyId .Values.secrets.r2SecretAccessKey (include "statehouse.devStore" .)) -}}
true
{{- end }}
{{- end }}

{{/* "true" when the chart creates its own Secret (some secret value given or generated, no existingSecret). */}}
{{- define "statehouse.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.tursoToken .Values.secrets.alarmSecret (include "statehouse.chartR2Keys" .) .Values.secrets.icebergReaderAccessKeyId .Values.auth.tokens .Values.auth.jwt.hs256Secret (include "statehouse.chartPeerSecret" .) (include "statehouse.generatedAdmin" .)) -}}
true
{{- end }}
{{- end }}

{{/*
The release namespace's Secrets as the cluster has them: a SecretList under
`helm install` and `helm upgrade`, an empty map under `helm template` and any
other render without a cluster, where `lookup` sees nothing. (Helm keeps its
release records as Secrets in that namespace, so whoever installs can list them.)
*/}}
{{- define "statehouse.clusterSecrets" -}}
{{- lookup "v1" "Secret" .Release.Namespace "" | toJson }}
{{- end }}

{{/* "true" when this render reads the cluster (a list lookup always answers with items there). */}}
{{- define "statehouse.clusterReachable" -}}
{{- if hasKey (include "statehouse.clusterSecrets" . | fromJson) "items" -}}
true
{{- end }}
{{- end }}

{{/* The data (base64 values) of the release's own Secret as the cluster has it, as JSON; {} when there is none. */}}
{{- define "statehouse.keptSecretData" -}}
{{- $name := include "statehouse.fullname" . }}
{{- $data := dict }}
{{- range (include "statehouse.clusterSecrets" . | fromJson).items | default list }}
{{- if eq .metadata.name $name }}
{{- $data = .data | default dict }}
{{- end }}
{{- end }}
{{- $data | toJson }}
{{- end }}

{{/*
A secret the chart can make up: the value given (.given); else the one the
release's Secret already holds under .key, so upgrades keep it and every pod,
old or new, agrees; else .generated. Called as
include "statehouse.keptOr" (dict "ctx" $ "given" ... "key" ... "generated" ...).
*/}}
{{- define "statehouse.keptOr" -}}
{{- if .given }}
{{- .given }}
{{- else }}
{{- $kept := get (include "statehouse.keptSecretData" .ctx | fromJson) .key }}
{{- if $kept }}
{{- $kept | b64dec }}
{{- else }}
{{- .generated }}
{{- end }}
{{- end }}
{{- end }}

{{/* STATEHOUSE_PEER_SECRET for the chart's Secret: auth.peerSecret, kept, or 48 random characters. */}}
{{- define "statehouse.peerSecret" -}}
{{- include "statehouse.keptOr" (dict "ctx" . "given" .Values.auth.peerSecret "key" .Values.secrets.keys.peerSecret "generated" (randAlphaNum 48)) }}
{{- end }}

{{/* The generated admin token: kept, or `sh_` and 43 random characters (256 bits, like `statehouse token`). */}}
{{- define "statehouse.adminToken" -}}
{{- include "statehouse.keptOr" (dict "ctx" . "given" "" "key" (include "statehouse.adminTokenKey" .) "generated" (printf "sh_%s" (randAlphaNum 43))) }}
{{- end }}

{{/* The line STATEHOUSE_AUTH_TOKENS holds for an admin token, as `statehouse token` prints it. */}}
{{- define "statehouse.adminTokenLine" -}}
{{- printf "admin sha256:%s * read,write,admin" (sha256sum .) }}
{{- end }}

{{/* The object-store keys: given in the values, kept, or made up for the development store. */}}
{{- define "statehouse.r2AccessKeyId" -}}
{{- include "statehouse.keptOr" (dict "ctx" . "given" .Values.secrets.r2AccessKeyId "key" .Values.secrets.keys.r2AccessKeyId "generated" (randAlphaNum 20)) }}
{{- end }}
{{- define "statehouse.r2SecretAccessKey" -}}
{{- include "statehouse.keptOr" (dict "ctx" . "given" .Values.secrets.r2SecretAccessKey "key" .Values.secrets.keys.r2SecretAccessKey "generated" (randAlphaNum 40)) }}
{{- end }}

{{/*
Checksum of what the chart's Secret is made of, for the pod annotation that rolls the
pods when a secret value changes. Taken over the values rather than the rendered
Secret: a generated value would make it differ on every render (the Deployment's
render and the Secret's each draw one on a fresh install), and once generated it
never changes anyway.
*/}}
{{- define "statehouse.secretChecksum" -}}
{{- $auth := pick .Values.auth "tokens" "peerSecret" "jwt" }}
{{- dict "secrets" .Values.secrets "auth" $auth "peer" (include "statehouse.chartPeerSecret" .) "create" (include "statehouse.createSecret" .) "admin" (include "statehouse.generatedAdmin" .) "r2" (include "statehouse.chartR2Keys" .) | toJson | sha256sum }}
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
{{- if and (include "statehouse.generatedAdmin" .) (not (include "statehouse.clusterReachable" .)) }}
{{- fail "statehouse: no authentication is configured. `helm install` would generate an admin token and keep it in the release's Secret, but this render cannot read the cluster (helm template, a client-side dry run, Argo CD), so a token made here would change on every render. Set auth.tokens to token lines from `statehouse token --name <name> --namespaces <patterns> --rights <rights>` (e.g. --set-json 'auth.tokens=[\"<line>\"]'), or auth.tokensFile.secretName, or auth.jwt (hs256Secret or jwks, with audience and issuer), or secrets.existingSecret holding STATEHOUSE_AUTH_TOKENS and STATEHOUSE_PEER_SECRET. Only for a throwaway development install: auth.insecure=true." }}
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

{{/* "true" when the pods use the chart's development object store (MinIO). */}}
{{- define "statehouse.devStore" -}}
{{- if and .Values.minio.enabled (not .Values.config.objectStore.endpoint) -}}
true
{{- end }}
{{- end }}

{{- define "statehouse.minio.fullname" -}}
{{- printf "%s-minio" (include "statehouse.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "statehouse.minio.labels" -}}
{{ include "statehouse.commonLabels" . }}
app.kubernetes.io/component: minio
{{- end }}

{{- define "statehouse.minio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "statehouse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: minio
{{- end }}

{{/*
R2_ENDPOINT: config.objectStore.endpoint, else the development MinIO. Every pod
must reach one store: with the shared database and a folder per pod, a blob
uploaded through one pod would be listed by all and readable on one.
*/}}
{{- define "statehouse.objectStoreEndpoint" -}}
{{- if .Values.config.objectStore.endpoint }}
{{- .Values.config.objectStore.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s:9000" (include "statehouse.minio.fullname" .) }}
{{- else }}
{{- fail "statehouse: set config.objectStore.endpoint and config.objectStore.bucket to an S3-compatible store every pod shares (R2, S3, Tigris, MinIO), or minio.enabled=true for the chart's development store: with a shared database and a folder per pod, blobs and Iceberg files would be scattered over the pods, and the server refuses to start that way" }}
{{- end }}
{{- end }}

{{/* Refuses an object store the pods could not use, with what to set instead. */}}
{{- define "statehouse.validateObjectStore" -}}
{{- $store := include "statehouse.objectStoreEndpoint" . }}
{{- if and .Values.config.objectStore.endpoint (not .Values.secrets.existingSecret) (not (and .Values.secrets.r2AccessKeyId .Values.secrets.r2SecretAccessKey)) }}
{{- fail "statehouse: config.objectStore.endpoint needs its keys: secrets.r2AccessKeyId and secrets.r2SecretAccessKey, or secrets.existingSecret holding R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY" }}
{{- end }}
{{- with .Values.secrets }}
{{- if ne (empty .icebergReaderAccessKeyId) (empty .icebergReaderSecretAccessKey) }}
{{- fail "statehouse: set secrets.icebergReaderAccessKeyId and secrets.icebergReaderSecretAccessKey together or not at all (a read-only key pair the Iceberg catalog hands to analysts)" }}
{{- end }}
{{- if and .icebergReaderAccessKeyId (include "statehouse.chartR2Keys" $) (eq .icebergReaderAccessKeyId (include "statehouse.r2AccessKeyId" $)) }}
{{- fail "statehouse: secrets.icebergReaderAccessKeyId is the pods' own store key (R2_ACCESS_KEY_ID), which can write and delete everything: create a read-only key for analysts instead (the Iceberg catalog hands it to every analytics caller)" }}
{{- end }}
{{- end }}
{{- end }}
