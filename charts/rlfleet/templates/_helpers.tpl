{{/*
Names, labels and the pieces every workload shares. Templates pass a dict
`(dict "root" $ "name" "<component>")` to the component helpers.
*/}}

{{- define "rlfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The services the chart runs, in start order. */}}
{{- define "rlfleet.components" -}}
weightsync reward trainer rollout scheduler
{{- end }}

{{- define "rlfleet.labels" -}}
helm.sh/chart: {{ include "rlfleet.chart" . }}
{{ include "rlfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlfleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "rlfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "name" "scheduler") */}}
{{- define "rlfleet.componentLabels" -}}
{{ include "rlfleet.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "rlfleet.componentSelectorLabels" -}}
{{ include "rlfleet.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Resource name of one component: <fullname>-<component> */}}
{{- define "rlfleet.componentName" -}}
{{- printf "%s-%s" (include "rlfleet.fullname" .root) .name }}
{{- end }}

{{- define "rlfleet.schedulerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-scheduler" (include "rlfleet.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlfleet.workloadServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlfleet.fullname" .) .Values.serviceAccount.workloadName }}
{{- else }}
{{- default "default" .Values.serviceAccount.workloadName }}
{{- end }}
{{- end }}

{{/* Image of one component; GPU components get the CUDA variant of the tag. */}}
{{- define "rlfleet.image" -}}
{{- $root := .root }}
{{- $c := index $root.Values .name }}
{{- $repo := default $root.Values.image.repository $c.image.repository }}
{{- $tag := $c.image.tag }}
{{- if not $tag }}
{{- $tag = default $root.Chart.AppVersion $root.Values.image.tag }}
{{- if gt (int $c.gpu.count) 0 }}
{{- $tag = printf "%s%s" $tag $root.Values.image.cudaSuffix }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* In-cluster gRPC address of a ClusterIP component Service. */}}
{{- define "rlfleet.address" -}}
{{- $c := index .root.Values .name }}
{{- printf "%s.%s.svc:%d" (include "rlfleet.componentName" .) .root.Release.Namespace (int $c.service.grpcPort) }}
{{- end }}

{{/* Port of weight sync's data plane when it runs ("" when weightsync.dataPort is -1 or
weight sync is off). Clients learn it from weight sync (GetDataPlane) and dial it on the
weight-sync Service, so the pod and the Service use the same number. */}}
{{- define "rlfleet.dataPort" -}}
{{- $ws := .Values.weightsync }}
{{- if and $ws.enabled (gt (int $ws.dataPort) 0) }}
{{- if has (int $ws.dataPort) (list (int .Values.ports.grpc) (int .Values.ports.metrics)) }}
{{- fail (printf "weightsync.dataPort (%d) must differ from ports.grpc and ports.metrics" (int $ws.dataPort)) }}
{{- end }}
{{- int $ws.dataPort }}
{{- end }}
{{- end }}

{{/* Stable DNS names of the rollout StatefulSet pods, comma-separated. */}}
{{- define "rlfleet.rolloutAddresses" -}}
{{- $name := include "rlfleet.componentName" (dict "root" . "name" "rollout") }}
{{- $addrs := list }}
{{- range $i := until (int .Values.rollout.replicas) }}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.ports.grpc)) }}
{{- end }}
{{- join "," $addrs }}
{{- end }}

{{/* Secret and key that hold the Redis password (bundled Redis). */}}
{{- define "rlfleet.redisPasswordSecret" -}}
{{- default (printf "%s-redis" (include "rlfleet.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* Secret and key that hold the whole Redis URL (external Redis). */}}
{{- define "rlfleet.redisUrlSecret" -}}
{{- default (printf "%s-redis-url" (include "rlfleet.fullname" .)) .Values.redis.external.existingSecret }}
{{- end }}

{{/* Environment that gives a service its Redis URL without putting a password in the spec:
Kubernetes expands $(RLFLEET_REDIS_PASSWORD) from the variable defined just before it. */}}
{{- define "rlfleet.redisEnv" -}}
{{- $root := .root }}
{{- $var := printf "RLFLEET_%s_REDIS_URL" (upper .name) }}
{{- if $root.Values.redis.enabled }}
{{- $host := printf "%s-redis.%s.svc:6379" (include "rlfleet.fullname" $root) $root.Release.Namespace }}
{{- if $root.Values.redis.auth.enabled }}
- name: RLFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "rlfleet.redisPasswordSecret" $root }}
      key: {{ $root.Values.redis.auth.existingSecretPasswordKey }}
- name: {{ $var }}
  value: {{ printf "redis://:$(RLFLEET_REDIS_PASSWORD)@%s/0" $host | quote }}
{{- else }}
- name: {{ $var }}
  value: {{ printf "redis://%s/0" $host | quote }}
{{- end }}
{{- else }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ include "rlfleet.redisUrlSecret" $root }}
      key: {{ $root.Values.redis.external.existingSecretKey }}
{{- end }}
{{- end }}

{{/* Native gRPC probes (Kubernetes >= 1.27) against the standard health service. */}}
{{- define "rlfleet.probes" -}}
{{- $root := .root }}
{{- $c := index $root.Values .name }}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := index $c.probes $kind }}
{{- if $p.enabled }}
{{ $kind }}Probe:
  grpc:
    port: {{ $root.Values.ports.grpc }}
    service: {{ $c.probes.grpcService | quote }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}
{{- end }}
{{- end }}

{{/* Requests and limits with the component's GPUs added to both (extended resources must
match). */}}
{{- define "rlfleet.resources" -}}
{{- $c := .c }}
{{- $res := deepCopy (default dict $c.resources) }}
{{- if gt (int $c.gpu.count) 0 }}
{{- $req := default dict $res.requests }}
{{- $lim := default dict $res.limits }}
{{- $_ := set $req $c.gpu.resourceName (int $c.gpu.count) }}
{{- $_ := set $lim $c.gpu.resourceName (int $c.gpu.count) }}
{{- $_ := set $res "requests" $req }}
{{- $_ := set $res "limits" $lim }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Flags of one component beyond the common ones. */}}
{{- define "rlfleet.componentArgs" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- if eq $name "scheduler" }}
- --http-port
- {{ $root.Values.ports.http | quote }}
- --auth
- {{ $root.Values.scheduler.api.auth }}
{{- if $root.Values.scheduler.api.tokensSecret }}
- --api-tokens-file
- {{ printf "%s/%s" (include "rlfleet.apiTokensDir" $root) $root.Values.scheduler.api.tokensSecretKey | quote }}
{{- end }}
- --discovery
- {{ $root.Values.scheduler.rolloutDiscovery }}
{{- if eq $root.Values.scheduler.rolloutDiscovery "static" }}
- --rollout-addresses
- {{ include "rlfleet.rolloutAddresses" $root | quote }}
{{- end }}
- --reward-address
- {{ include "rlfleet.address" (dict "root" $root "name" "reward") }}
- --trainer-address
- {{ include "rlfleet.address" (dict "root" $root "name" "trainer") }}
- --weightsync-address
- {{ include "rlfleet.address" (dict "root" $root "name" "weightsync") }}
{{- else if eq $name "rollout" }}
- --engine
- {{ $root.Values.rollout.engine }}
- --weightsync-address
- {{ include "rlfleet.address" (dict "root" $root "name" "weightsync") }}
{{- if $root.Values.model.path }}
- --model-path
- {{ $root.Values.model.path | quote }}
{{- end }}
{{- else if eq $name "trainer" }}
- --weightsync-address
- {{ include "rlfleet.address" (dict "root" $root "name" "weightsync") }}
- --checkpoint-dir
- {{ $root.Values.trainer.checkpoints.mountPath | quote }}
{{- else if eq $name "weightsync" }}
- --spool-dir
- {{ $root.Values.weightsync.spool.mountPath | quote }}
# The weight data plane on a fixed port (the Service exposes it); -1: off.
- --data-port
- {{ $root.Values.weightsync.dataPort | quote }}
{{- end }}
{{- end }}

{{/* Component-specific environment. */}}
{{- define "rlfleet.componentEnv" -}}
{{- $root := .root }}
{{- if eq .name "rollout" }}
# Each replica reports under its pod name, which the StatefulSet keeps stable, and is
# reached at its stable DNS name under the headless Service.
- name: RLFLEET_ROLLOUT_REPLICA_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: RLFLEET_ROLLOUT_ADVERTISE_ADDRESS
  value: {{ printf "$(RLFLEET_ROLLOUT_REPLICA_ID).%s.%s.svc:%d" (include "rlfleet.componentName" .) $root.Release.Namespace (int $root.Values.ports.grpc) | quote }}
{{- else if and (eq .name "scheduler") (eq $root.Values.scheduler.rolloutDiscovery "kubernetes") }}
# Where the scheduler looks for rollout pods through the Kubernetes API (the Role allows
# get/list/watch of pods and endpoints in this namespace only).
- name: RLFLEET_SCHEDULER_ROLLOUT_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RLFLEET_SCHEDULER_ROLLOUT_SELECTOR
  value: {{ printf "app.kubernetes.io/instance=%s,app.kubernetes.io/component=rollout" $root.Release.Name | quote }}
- name: RLFLEET_SCHEDULER_ROLLOUT_PORT
  value: {{ $root.Values.ports.grpc | quote }}
{{- end }}
{{- end }}

{{/* Where the scheduler sees the API token hashes (scheduler.api.tokensSecret). */}}
{{- define "rlfleet.apiTokensDir" -}}
/var/run/rlfleet/api-tokens
{{- end }}

{{/* Does this component mount the model volume? */}}
{{- define "rlfleet.usesModel" -}}
{{- if has .name (list "scheduler" "rollout" "trainer") }}true{{ end }}
{{- end }}

{{/* The pod template of an rlfleet service: (dict "root" $ "name" "<component>") */}}
{{- define "rlfleet.podTemplate" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $c := index $root.Values $name }}
metadata:
  labels:
    {{- include "rlfleet.componentLabels" . | nindent 4 }}
    {{- with $c.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Restart pods when their settings change.
    checksum/config: {{ toToml (default dict $c.config) | sha256sum }}
    {{- with $c.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if eq $name "scheduler" }}
  serviceAccountName: {{ include "rlfleet.schedulerServiceAccountName" $root }}
  automountServiceAccountToken: true
  {{- else }}
  serviceAccountName: {{ include "rlfleet.workloadServiceAccountName" $root }}
  automountServiceAccountToken: false
  {{- end }}
  # Service links would inject RLFLEET_<SERVICE>_PORT=tcp://... into the environment, which
  # the services read as their own settings.
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ $name }}
      image: {{ include "rlfleet.image" . | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["rlfleet"]
      args:
        - {{ $name }}
        - --host
        - "0.0.0.0"
        - --port
        - {{ $root.Values.ports.grpc | quote }}
        - --metrics-port
        - {{ $root.Values.ports.metrics | quote }}
        - --log-format
        - {{ $root.Values.logFormat }}
        - --log-level
        - {{ $root.Values.logLevel }}
        - --config
        - /etc/rlfleet/config.toml
        {{- with include "rlfleet.componentArgs" . | trim }}{{ . | nindent 8 }}{{ end }}
        {{- with $c.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "rlfleet.redisEnv" . | trim | nindent 8 }}
        {{- with include "rlfleet.componentEnv" . | trim }}{{ . | nindent 8 }}{{ end }}
        - name: HOME
          value: /home/rlfleet
        - name: XDG_CACHE_HOME
          value: /home/rlfleet/.cache
        {{- with $c.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $root.Values.ports.grpc }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $root.Values.ports.metrics }}
          protocol: TCP
        {{- if eq $name "scheduler" }}
        - name: http
          containerPort: {{ $root.Values.ports.http }}
          protocol: TCP
        {{- end }}
        {{- if eq $name "weightsync" }}
        {{- with include "rlfleet.dataPort" $root }}
        - name: data
          containerPort: {{ . }}
          protocol: TCP
        {{- end }}
        {{- end }}
      {{- with include "rlfleet.probes" . | trim }}{{ . | nindent 6 }}{{ end }}
      resources:
        {{- include "rlfleet.resources" (dict "c" $c) | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/rlfleet
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/rlfleet/.cache
        {{- if hasKey $c "shmSize" }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
        {{- if include "rlfleet.usesModel" . }}
        - name: model
          mountPath: {{ $root.Values.model.mountPath }}
          readOnly: true
          {{- with $root.Values.model.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- if eq $name "trainer" }}
        - name: checkpoints
          mountPath: {{ $c.checkpoints.mountPath }}
        {{- end }}
        {{- if eq $name "weightsync" }}
        - name: spool
          mountPath: {{ $c.spool.mountPath }}
        {{- end }}
        {{- if and (eq $name "scheduler") $root.Values.scheduler.api.tokensSecret }}
        # A directory mount (no subPath), so a rotated Secret reaches the pod and the
        # scheduler re-reads the file without a restart.
        - name: api-tokens
          mountPath: {{ include "rlfleet.apiTokensDir" $root }}
          readOnly: true
        {{- end }}
        {{- with $c.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "rlfleet.componentName" . }}
    - name: tmp
      emptyDir: {}
    - name: cache
      emptyDir: {}
    {{- if hasKey $c "shmSize" }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $c.shmSize }}
    {{- end }}
    {{- if include "rlfleet.usesModel" . }}
    - name: model
      {{- if $root.Values.model.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $root.Values.model.existingClaim }}
        readOnly: true
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    {{- if eq $name "trainer" }}
    - name: checkpoints
      {{- include "rlfleet.dataVolume" (dict "root" $root "name" "trainer-checkpoints" "p" $c.checkpoints.persistence) | nindent 6 }}
    {{- end }}
    {{- if eq $name "weightsync" }}
    - name: spool
      {{- include "rlfleet.dataVolume" (dict "root" $root "name" "weightsync-spool" "p" $c.spool.persistence) | nindent 6 }}
    {{- end }}
    {{- if and (eq $name "scheduler") $root.Values.scheduler.api.tokensSecret }}
    - name: api-tokens
      secret:
        secretName: {{ $root.Values.scheduler.api.tokensSecret }}
        items:
          - key: {{ $root.Values.scheduler.api.tokensSecretKey }}
            path: {{ $root.Values.scheduler.api.tokensSecretKey }}
    {{- end }}
    {{- with $c.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $c.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $c.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A claim the chart made, an existing claim, or an emptyDir. */}}
{{- define "rlfleet.dataVolume" -}}
{{- if .p.enabled }}
persistentVolumeClaim:
  claimName: {{ default (include "rlfleet.componentName" .) .p.existingClaim }}
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}

{{/* Pod selector of one component, for NetworkPolicy peers. */}}
{{- define "rlfleet.peer" -}}
- podSelector:
    matchLabels:
      {{- include "rlfleet.componentSelectorLabels" . | nindent 6 }}
{{- end }}
