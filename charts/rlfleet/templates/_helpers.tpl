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
weightsync reward env trainer rollout scheduler
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

{{/* Native gRPC probes (Kubernetes >= 1.27) against the standard health service. A trainer
over several pods gets exec probes instead: only pod 0 (global rank 0) serves gRPC, and one
pod template serves every ordinal, so files/trainer_probe.py checks the health service on
pod 0 and passes on the others. */}}
{{- define "rlfleet.probes" -}}
{{- $root := .root }}
{{- $c := index $root.Values .name }}
{{- $exec := and (eq .name "trainer") (include "rlfleet.trainerMultiPod" $root) }}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := index $c.probes $kind }}
{{- if $p.enabled }}
{{ $kind }}Probe:
  {{- if $exec }}
  exec:
    command:
      - python
      - {{ include "rlfleet.scriptsDir" $root }}/trainer_probe.py
      - {{ $root.Values.ports.grpc | quote }}
      - {{ $c.probes.grpcService | quote }}
      - {{ $p.timeoutSeconds | quote }}
  {{- else }}
  grpc:
    port: {{ $root.Values.ports.grpc }}
    service: {{ $c.probes.grpcService | quote }}
  {{- end }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}
{{- end }}
{{- end }}

{{/* Requests and limits with the component's GPUs added to both (extended resources must
match), and `memory` (when given) as both the memory request and limit. */}}
{{- define "rlfleet.resources" -}}
{{- $c := .c }}
{{- $res := deepCopy (default dict $c.resources) }}
{{- with .memory }}
{{- $_ := set $res "requests" (set (default dict $res.requests) "memory" .) }}
{{- $_ := set $res "limits" (set (default dict $res.limits) "memory" .) }}
{{- end }}
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
{{- if $root.Values.env.enabled }}
# Jobs with a task.environment play their episodes in the env service (one pod).
- --env-address
- {{ include "rlfleet.address" (dict "root" $root "name" "env") }}
{{- end }}
{{- else if eq $name "rollout" }}
- --engine
- {{ $root.Values.rollout.engine }}
{{- if and (eq $root.Values.rollout.engine "vllm") (gt (int $root.Values.rollout.gpu.count) 0) }}
# vLLM shards the model over every GPU of the replica.
- --tensor-parallel-size
- {{ $root.Values.rollout.gpu.count | quote }}
{{- end }}
- --weightsync-address
- {{ include "rlfleet.address" (dict "root" $root "name" "weightsync") }}
{{- with include "rlfleet.modelPath" $root }}
- --model-path
- {{ . | quote }}
{{- end }}
{{- else if eq $name "reward" }}
{{- with include "rlfleet.bufferMaxLen" $root }}
# The buffer's bound, below Redis's maxmemory: reward's backpressure comes before Redis
# refuses writes.
- --buffer-max-len
- {{ . | quote }}
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
{{- else if eq .name "trainer" }}
# Replicas of a collective job (weights.transport) meet the trainer at its pod IP.
- name: RLFLEET_TRAINER_WEIGHT_GROUP_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if include "rlfleet.trainerDistributed" $root }}
{{ include "rlfleet.trainerRankEnv" $root }}
{{- end }}
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
  {{- if and (include "rlfleet.usesModel" .) (include "rlfleet.modelDownloads" $root) }}
  initContainers:
    {{- include "rlfleet.modelInitContainer" . | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $name }}
      image: {{ include "rlfleet.image" . | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if and (eq $name "trainer") (include "rlfleet.trainerDistributed" $root) }}
      # torchrun starts one rank per GPU of this pod and joins them with the other pods' at
      # pod 0 (static rendezvous; the node rank is the pod's ordinal). The same numbers are
      # in the environment (NNODES, NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT).
      command: ["torchrun"]
      args:
        - --nnodes={{ $root.Values.trainer.replicas }}
        - --nproc-per-node={{ include "rlfleet.trainerRanksPerPod" $root }}
        - --node-rank=$(NODE_RANK)
        - --master-addr={{ include "rlfleet.trainerMasterAddr" $root }}
        - --master-port={{ $root.Values.trainer.distributed.masterPort }}
        - --module
        - rlfleet.trainer
      {{- else }}
      command: ["rlfleet"]
      args:
        - {{ $name }}
      {{- end }}
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
        {{- if ne $name "env" }}
        {{- /* The env service keeps its episodes in memory and uses no Redis. */}}
        {{- include "rlfleet.redisEnv" . | trim | nindent 8 }}
        {{- end }}
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
        {{- if and (eq $name "trainer") (include "rlfleet.trainerDistributed" $root) }}
        # torchrun's rendezvous store (listening on pod 0).
        - name: rdzv
          containerPort: {{ $root.Values.trainer.distributed.masterPort }}
          protocol: TCP
        {{- end }}
      {{- with include "rlfleet.probes" . | trim }}{{ . | nindent 6 }}{{ end }}
      resources:
        {{- include "rlfleet.resources" (dict "c" $c "memory" (ternary (include "rlfleet.weightsyncMemory" $root) "" (eq $name "weightsync"))) | nindent 8 }}
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
        {{- if and (eq $name "trainer") (include "rlfleet.trainerMultiPod" $root) }}
        - name: scripts
          mountPath: {{ include "rlfleet.scriptsDir" $root }}
          readOnly: true
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
      {{- include "rlfleet.modelVolume" $root | nindent 6 }}
    {{- end }}
    {{- if include "rlfleet.usesScripts" . }}
    - name: scripts
      configMap:
        name: {{ include "rlfleet.componentName" (dict "root" $root "name" "scripts") }}
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

{{/* ------------------------------------------------------------------------------------
Sizes. A Kubernetes quantity ("4Gi", "500M", "1.5G") as whole bytes, so the chart can derive
one setting from another (Redis's maxmemory from its memory limit):
(dict "q" <quantity> "name" <the value's path, for the error>).
*/}}
{{- define "rlfleet.bytes" -}}
{{- $q := .q }}
{{- if kindIs "string" $q }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $units := dict "" 1.0 "k" 1e3 "K" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 }}
{{- if or (not $num) (not (hasKey $units $unit)) }}
{{- fail (printf "%s: cannot read %q as a memory size (use e.g. 4Gi or 4096Mi)" .name $q) }}
{{- end }}
{{- printf "%d" (mulf (float64 $num) (index $units $unit) | floor | int64) }}
{{- else }}
{{- printf "%d" (int64 $q) }}
{{- end }}
{{- end }}

{{/* Redis's maxmemory in bytes: `maxmemoryPercent` of its memory limit ("" when there is no
limit or the percentage is 0). */}}
{{- define "rlfleet.redisMaxmemory" -}}
{{- $r := .Values.redis }}
{{- $limit := dig "limits" "memory" "" (default dict $r.resources) }}
{{- if and $r.enabled $limit (gt (int $r.maxmemoryPercent) 0) }}
{{- div (mul (include "rlfleet.bytes" (dict "q" $limit "name" "redis.resources.limits.memory") | int64) (int64 $r.maxmemoryPercent)) 100 }}
{{- end }}
{{- end }}

{{/* Bytes one sample takes in the buffer, for sizing: 16 per token (prompt and completion ids,
a log-prob and a policy version per completion token, the completion text) plus 4 KiB
(ids, task JSON, stream and id-set overhead). */}}
{{- define "rlfleet.sampleBytes" -}}
{{- add (mul (int64 .Values.buffer.sampleTokens) 16) 4096 }}
{{- end }}

{{/* The experience buffer's bound passed to reward as --buffer-max-len: `buffer.maxLen`, or
derived from the bundled Redis's maxmemory; "" leaves reward's own setting (its config or
its default). */}}
{{- define "rlfleet.bufferMaxLen" -}}
{{- $b := .Values.buffer }}
{{- if gt (int $b.maxLen) 0 }}
{{- int64 $b.maxLen }}
{{- else if not (hasKey (default dict .Values.reward.config) "buffer_max_len") }}
{{- with include "rlfleet.redisMaxmemory" . }}
{{- div (div (mul (int64 .) (int64 $b.memoryPercent)) 100) (include "rlfleet.sampleBytes" $ | int64) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Versions weight sync keeps per job (its setting, or the service's default). */}}
{{- define "rlfleet.keepVersions" -}}
{{- int (default 2 (index (default dict .Values.weightsync.config) "keep_versions")) }}
{{- end }}

{{/* Weight sync's memory from model.sizeGiB: keep_versions versions, the one arriving
counted (they are mapped spool files: page cache, kept resident within this limit), + the
process ("" when model.sizeGiB is 0). */}}
{{- define "rlfleet.weightsyncMemory" -}}
{{- $size := float64 .Values.model.sizeGiB }}
{{- if gt $size 0.0 }}
{{- $keep := include "rlfleet.keepVersions" . | float64 }}
{{- printf "%dGi" (addf (mulf $keep $size) (float64 .Values.weightsync.sizing.memoryOverheadGiB) | ceil | int64) }}
{{- end }}
{{- end }}

{{/* Weight sync's spool from model.sizeGiB: keep_versions files, the one arriving counted
(the oldest is deleted before the next is received), and 10% for the filesystem. */}}
{{- define "rlfleet.weightsyncSpool" -}}
{{- $size := float64 .Values.model.sizeGiB }}
{{- if gt $size 0.0 }}
{{- $keep := include "rlfleet.keepVersions" . | float64 }}
{{- printf "%dGi" (mulf (mulf $keep $size) 1.1 | ceil | int64) }}
{{- end }}
{{- end }}

{{/* ------------------------------------------------------------------------------------
Trainer ranks. Each trainer pod runs one rank per GPU (one on CPU); with more than one rank
in all, torchrun starts them and joins every pod's ranks at pod 0.
*/}}
{{- define "rlfleet.trainerRanksPerPod" -}}
{{- max 1 (int .Values.trainer.gpu.count) }}
{{- end }}

{{- define "rlfleet.trainerWorld" -}}
{{- mul (int .Values.trainer.replicas) (include "rlfleet.trainerRanksPerPod" . | int) }}
{{- end }}

{{/* "true" when the trainer runs under torchrun. */}}
{{- define "rlfleet.trainerDistributed" -}}
{{- if and .Values.trainer.enabled (gt (include "rlfleet.trainerWorld" . | int) 1) }}true{{ end }}
{{- end }}

{{/* "true" when the trainer's ranks span pods (then only pod 0 serves gRPC). */}}
{{- define "rlfleet.trainerMultiPod" -}}
{{- if and .Values.trainer.enabled (gt (int .Values.trainer.replicas) 1) }}true{{ end }}
{{- end }}

{{/* Headless Service that gives each trainer pod a stable DNS name (rendezvous). */}}
{{- define "rlfleet.trainerRanksService" -}}
{{- printf "%s-ranks" (include "rlfleet.componentName" (dict "root" . "name" "trainer")) }}
{{- end }}

{{/* torchrun's rendezvous host: pod 0 by its stable name; loopback when there is one pod
(nothing to resolve, and no DNS record to wait for). */}}
{{- define "rlfleet.trainerMasterAddr" -}}
{{- if include "rlfleet.trainerMultiPod" . }}
{{- printf "%s-0.%s.%s.svc" (include "rlfleet.componentName" (dict "root" . "name" "trainer")) (include "rlfleet.trainerRanksService" .) .Release.Namespace }}
{{- else }}127.0.0.1{{ end }}
{{- end }}

{{/* The launcher's view of the ranks, as environment. torchrun gets the same numbers as flags
and sets RANK, LOCAL_RANK and WORLD_SIZE for each rank it starts; these let anything in the
pod (and people) see the layout. NODE_RANK is the pod's ordinal: the StatefulSet's pod-index
label (Kubernetes >= 1.28) when there are several pods. */}}
{{- define "rlfleet.trainerRankEnv" -}}
- name: NODE_RANK
{{- if include "rlfleet.trainerMultiPod" . }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
{{- else }}
  value: "0"
{{- end }}
- name: NNODES
  value: {{ .Values.trainer.replicas | quote }}
- name: NPROC_PER_NODE
  value: {{ include "rlfleet.trainerRanksPerPod" . | quote }}
- name: WORLD_SIZE
  value: {{ include "rlfleet.trainerWorld" . | quote }}
- name: MASTER_ADDR
  value: {{ include "rlfleet.trainerMasterAddr" . | quote }}
- name: MASTER_PORT
  value: {{ .Values.trainer.distributed.masterPort | quote }}
{{- end }}

{{/* ------------------------------------------------------------------------------------
Model storage.
*/}}
{{/* Where the model is (and, for hub/s3, where it is downloaded to). */}}
{{- define "rlfleet.modelPath" -}}
{{- $m := .Values.model }}
{{- if $m.path }}
{{- $m.path }}
{{- else if eq $m.source "hub" }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (base $m.hub.repo) }}
{{- else if eq $m.source "s3" }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (base (trimSuffix "/" (default $m.s3.bucket $m.s3.prefix))) }}
{{- end }}
{{- end }}

{{- define "rlfleet.modelDownloads" -}}
{{- if has .Values.model.source (list "hub" "s3") }}true{{ end }}
{{- end }}

{{/* Claim the download goes into: the existing one, the chart's, or "" (an emptyDir per pod). */}}
{{- define "rlfleet.modelDownloadClaim" -}}
{{- $m := .Values.model }}
{{- if $m.existingClaim }}
{{- $m.existingClaim }}
{{- else if $m.download.persistence.enabled }}
{{- include "rlfleet.componentName" (dict "root" . "name" "model") }}
{{- end }}
{{- end }}

{{/* The node every model reader (scheduler, rollout, trainer) is pinned to by
`nodeSelector: {kubernetes.io/hostname: ...}`, or "" when they may land on several nodes.
A claim that only one node can mount is refused unless they are pinned. */}}
{{- define "rlfleet.pinnedNode" -}}
{{- $root := .root }}
{{- $hosts := list }}
{{- range $name := .names }}
{{- $c := index $root.Values $name }}
{{- if $c.enabled }}
{{- $hosts = append $hosts (index (default dict $c.nodeSelector) "kubernetes.io/hostname" | default "") }}
{{- end }}
{{- end }}
{{- $hosts = uniq $hosts }}
{{- if and (eq (len $hosts) 1) (first $hosts) }}{{ first $hosts }}{{ end }}
{{- end }}

{{/* Is any of these access modes one that pods on several nodes can share? */}}
{{- define "rlfleet.sharedAccess" -}}
{{- range . }}{{ if has . (list "ReadOnlyMany" "ReadWriteMany") }}true{{ end }}{{ end }}
{{- end }}

{{/* The model volume of a pod. */}}
{{- define "rlfleet.modelVolume" -}}
{{- $m := .Values.model }}
{{- if include "rlfleet.modelDownloads" . }}
{{- with include "rlfleet.modelDownloadClaim" . }}
persistentVolumeClaim:
  claimName: {{ . }}
{{- else }}
# No shared claim: each pod downloads its own copy.
emptyDir:
  sizeLimit: {{ $m.download.persistence.size }}
{{- end }}
{{- else if $m.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $m.existingClaim }}
  readOnly: true
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}

{{/* The init container that downloads the model (source hub or s3) before a service reads
it: files/fetch_model.py, run by the service's own image (huggingface_hub comes with
transformers; S3 requests are signed with the standard library). */}}
{{- define "rlfleet.modelInitContainer" -}}
{{- $root := .root }}
{{- $m := $root.Values.model }}
- name: fetch-model
  image: {{ include "rlfleet.image" . | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["python", "{{ include "rlfleet.scriptsDir" $root }}/fetch_model.py"]
  args:
    - --source
    - {{ $m.source }}
    - --dest
    - {{ include "rlfleet.modelPath" $root | quote }}
    - --stale-s
    - {{ $m.download.staleLockSeconds | quote }}
    {{- if eq $m.source "hub" }}
    - --repo
    - {{ $m.hub.repo | quote }}
    - --revision
    - {{ $m.hub.revision | quote }}
    {{- range $m.hub.ignorePatterns }}
    - --ignore
    - {{ . | quote }}
    {{- end }}
    {{- else }}
    - --bucket
    - {{ $m.s3.bucket | quote }}
    - --prefix
    - {{ $m.s3.prefix | quote }}
    - --region
    - {{ $m.s3.region | quote }}
    {{- with $m.s3.endpoint }}
    - --endpoint
    - {{ . | quote }}
    {{- end }}
    {{- if $m.s3.pathStyle }}
    - --path-style
    {{- end }}
    {{- end }}
    {{- if and (eq .name "scheduler") (not (include "rlfleet.modelDownloadClaim" $root)) }}
    # The scheduler reads only the tokenizer; with a volume of its own it fetches no weights.
    - --metadata-only
    {{- end }}
  env:
    - name: HOME
      value: /home/rlfleet
    - name: HF_HOME
      value: /home/rlfleet/.cache/huggingface
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- if eq $m.source "hub" }}
    {{- with $m.hub.endpoint }}
    - name: HF_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $m.hub.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $m.hub.tokenSecretKey }}
    {{- end }}
    {{- else if $m.s3.credentialsSecret }}
    - name: AWS_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef:
          name: {{ $m.s3.credentialsSecret }}
          key: {{ $m.s3.accessKeyIdKey }}
    - name: AWS_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $m.s3.credentialsSecret }}
          key: {{ $m.s3.secretAccessKeyKey }}
    {{- end }}
  resources:
    {{- toYaml $m.download.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath }}
      {{- with $m.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: scripts
      mountPath: {{ include "rlfleet.scriptsDir" $root }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /home/rlfleet/.cache
{{- end }}

{{/* Where pods see files/*.py (the `<fullname>-scripts` ConfigMap). */}}
{{- define "rlfleet.scriptsDir" -}}
/opt/rlfleet/scripts
{{- end }}

{{/* Does this component mount the scripts ConfigMap? */}}
{{- define "rlfleet.usesScripts" -}}
{{- if or (and (include "rlfleet.usesModel" .) (include "rlfleet.modelDownloads" .root)) (and (eq .name "trainer") (include "rlfleet.trainerMultiPod" .root)) }}true{{ end }}
{{- end }}

{{/* ------------------------------------------------------------------------------------
Values that cannot work, refused with a sentence that names them (templates/validate.yaml).
*/}}
{{- define "rlfleet.validate" -}}
{{- $v := .Values }}
{{- /* Trainer ranks. */}}
{{- if $v.trainer.enabled }}
{{- $t := $v.trainer }}
{{- $perPod := include "rlfleet.trainerRanksPerPod" . | int }}
{{- $world := include "rlfleet.trainerWorld" . | int }}
{{- if gt (int $t.ranks) 0 }}
{{- if mod (int $t.ranks) $perPod }}
{{- fail (printf "trainer.ranks (%d) is not a multiple of trainer.gpu.count (%d): each trainer pod runs one rank per GPU" (int $t.ranks) (int $t.gpu.count)) }}
{{- end }}
{{- if ne (int $t.ranks) $world }}
{{- fail (printf "trainer.ranks (%d) must equal trainer.replicas (%d) × trainer.gpu.count (%d ranks per pod) = %d: set trainer.replicas to %d" (int $t.ranks) (int $t.replicas) $perPod $world (div (int $t.ranks) $perPod)) }}
{{- end }}
{{- end }}
{{- if include "rlfleet.trainerMultiPod" . }}
{{- $p := $t.checkpoints.persistence }}
{{- if not $p.enabled }}
{{- fail (printf "trainer.checkpoints.persistence.enabled is false with trainer.replicas %d: every rank loads the checkpoint a job resumes from, so the trainer pods need one shared claim (ReadWriteMany)" (int $t.replicas)) }}
{{- end }}
{{- if and (not (include "rlfleet.sharedAccess" $p.accessModes)) (not (include "rlfleet.pinnedNode" (dict "root" . "names" (list "trainer")))) }}
{{- fail (printf "trainer.checkpoints.persistence.accessModes %v cannot be shared by trainer pods on several nodes (trainer.replicas %d): use ReadWriteMany" $p.accessModes (int $t.replicas)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* Model storage. */}}
{{- $m := $v.model }}
{{- $pinned := include "rlfleet.pinnedNode" (dict "root" . "names" (list "scheduler" "rollout" "trainer")) }}
{{- if eq $m.source "hub" }}
{{- if not $m.hub.repo }}
{{- fail "model.source is hub: set model.hub.repo (e.g. Qwen/Qwen2.5-7B-Instruct)" }}
{{- end }}
{{- if and $m.hub.private (not $m.hub.tokenSecret) }}
{{- fail (printf "model.hub.private is true but model.hub.tokenSecret is empty: %s needs a Hugging Face token; create a Secret with it (key model.hub.tokenSecretKey, %q) and name it in model.hub.tokenSecret" $m.hub.repo $m.hub.tokenSecretKey) }}
{{- end }}
{{- end }}
{{- if and (eq $m.source "s3") (not $m.s3.bucket) }}
{{- fail "model.source is s3: set model.s3.bucket (and model.s3.prefix)" }}
{{- end }}
{{- if include "rlfleet.modelDownloads" . }}
{{- $path := include "rlfleet.modelPath" . }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $m.mountPath)) $path) }}
{{- fail (printf "model.path (%s) must be a directory under model.mountPath (%s): the model is downloaded there" $path $m.mountPath) }}
{{- end }}
{{- end }}
{{- if $m.existingClaim }}
{{- if and (has $m.accessMode (list "ReadWriteOnce" "ReadWriteOncePod")) (not $pinned) }}
{{- fail (printf "model.accessMode %s: model.existingClaim (%s) is mounted by scheduler, rollout and trainer pods that may run on several nodes; use a ReadOnlyMany or ReadWriteMany claim, or pin those pods to one node (nodeSelector kubernetes.io/hostname)" $m.accessMode $m.existingClaim) }}
{{- end }}
{{- if and (include "rlfleet.modelDownloads" .) (eq $m.accessMode "ReadOnlyMany") }}
{{- fail (printf "model.accessMode is ReadOnlyMany, but model.source %s downloads into model.existingClaim (%s): it must be ReadWriteMany" $m.source $m.existingClaim) }}
{{- end }}
{{- else if and (include "rlfleet.modelDownloads" .) $m.download.persistence.enabled }}
{{- $modes := $m.download.persistence.accessModes }}
{{- if has "ReadOnlyMany" $modes }}
{{- fail "model.download.persistence.accessModes: ReadOnlyMany cannot be written; the download needs ReadWriteMany" }}
{{- end }}
{{- if and (not (include "rlfleet.sharedAccess" $modes)) (not $pinned) }}
{{- fail (printf "model.download.persistence.accessModes %v cannot be shared by scheduler, rollout and trainer pods on several nodes: use ReadWriteMany, or pin those pods to one node (nodeSelector kubernetes.io/hostname)" $modes) }}
{{- end }}
{{- end }}
{{- /* The env service: episodes live in its pod's memory, and its Service would send a Step to
any pod. */}}
{{- if and $v.env.enabled (gt (int $v.env.replicas) 1) }}
{{- fail (printf "env.replicas is %d: the env service keeps each episode in the memory of the pod that reset it, and its Service would send the episode's Steps to any pod (the others answer NOT_FOUND); set env.replicas to 1 (one pod serves many episodes at once: raise env.config.max_episodes, env.config.grpc_workers or env.resources instead)" (int $v.env.replicas)) }}
{{- end }}
{{- /* Rollout: vLLM's tensor-parallel size is the replica's GPU count. */}}
{{- $tp := index (default dict $v.rollout.config) "tensor_parallel_size" }}
{{- if and $v.rollout.enabled (eq $v.rollout.engine "vllm") (gt (int $v.rollout.gpu.count) 0) $tp (ne (int $tp) (int $v.rollout.gpu.count)) }}
{{- fail (printf "rollout.config.tensor_parallel_size (%d) differs from rollout.gpu.count (%d): the chart passes --tensor-parallel-size from the GPU count; remove the setting" (int $tp) (int $v.rollout.gpu.count)) }}
{{- end }}
{{- /* The buffer must fill before Redis does. */}}
{{- $maxmemory := include "rlfleet.redisMaxmemory" . }}
{{- $maxLen := include "rlfleet.bufferMaxLen" . | default (index (default dict $v.reward.config) "buffer_max_len" | default 0) | int64 }}
{{- if and $maxmemory (gt $maxLen 0) }}
{{- $need := mul $maxLen (include "rlfleet.sampleBytes" . | int64) }}
{{- if ge $need (int64 $maxmemory) }}
{{- fail (printf "buffer.maxLen (%d samples of up to buffer.sampleTokens %d tokens, about %d bytes) does not fit below the bundled Redis's maxmemory (%s bytes, redis.maxmemoryPercent %d%% of redis.resources.limits.memory %s): lower buffer.maxLen or raise the memory limit" $maxLen (int $v.buffer.sampleTokens) $need $maxmemory (int $v.redis.maxmemoryPercent) (toString $v.redis.resources.limits.memory)) }}
{{- end }}
{{- end }}
{{- end }}
