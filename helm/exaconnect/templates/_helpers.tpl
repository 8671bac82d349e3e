{{/* Names and labels. */}}
{{- define "exaconnect.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "exaconnect.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "exaconnect.selectorLabels" -}}
app.kubernetes.io/name: {{ include "exaconnect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "exaconnect.labels" -}}
{{ include "exaconnect.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: exaconnect
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "exaconnect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "exaconnect.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "exaconnect.claimName" -}}
{{- default (printf "%s-data" (include "exaconnect.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* The image: repository@digest, or repository:tag (default "<appVersion>-<flavour>"). */}}
{{- define "exaconnect.image" -}}
{{- $flavour := .Values.image.flavour -}}
{{- if not $flavour -}}
{{- $flavour = ternary "cpu" .Values.accelerator (eq .Values.accelerator "none") -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavour) .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "exaconnect.isSqs" -}}
{{- if or (hasPrefix "sqs://" .) (hasPrefix "https://" .) (hasPrefix "http://" .) -}}true{{- end -}}
{{- end -}}

{{/* The queue of one service, named as services/runner.py names it. Arg: dict root service svc. */}}
{{- define "exaconnect.queue" -}}
{{- if .svc.queue -}}
{{- .svc.queue -}}
{{- else if include "exaconnect.isSqs" .root -}}
{{- printf "%s-%s" (trimSuffix "-" (trimSuffix "/" .root)) .service -}}
{{- else -}}
{{- printf "%s/%s" (trimSuffix "/" .root) .service -}}
{{- end -}}
{{- end -}}

{{/* The accelerator kind of one service. Arg: dict ctx svc. */}}
{{- define "exaconnect.accelerator" -}}
{{- if .svc.accelerator -}}
{{- .svc.accelerator -}}
{{- else if .svc.accelerated -}}
{{- .ctx.Values.accelerator -}}
{{- else -}}
none
{{- end -}}
{{- end -}}

{{/* Checks that stop a bad configuration at install time, with the value to change. */}}
{{- define "exaconnect.validate" -}}
{{- $root := .Values.queue.root -}}
{{- if and (include "exaconnect.isSqs" $root) (not .Values.queue.ledgerDir) -}}
{{- fail "queue.root is an SQS prefix: set queue.ledgerDir to a folder on a volume every worker shares (otherwise each pod counts --max-attempts on its own)" -}}
{{- end -}}
{{- if and .Values.queue.ledgerDir (not .Values.persistence.enabled) (hasPrefix "/data" .Values.queue.ledgerDir) -}}
{{- fail "queue.ledgerDir is under /data but persistence.enabled=false: enable the shared volume or point ledgerDir at another shared mount" -}}
{{- end -}}
{{- if and (hasPrefix "fq://" $root) (not .Values.persistence.enabled) -}}
{{- fail "queue.root is a file queue (fq://) but persistence.enabled=false: file queues need the shared volume" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
{{- fail "autoscaling: enable keda or hpa, not both" -}}
{{- end -}}
{{- if .Values.autoscaling.keda.enabled -}}
{{- if not (include "exaconnect.isSqs" $root) -}}
{{- fail "autoscaling.keda scales on SQS queue depth: queue.root must be an SQS prefix (https://sqs.REGION.amazonaws.com/ACCOUNT/PREFIX)" -}}
{{- end -}}
{{- if not .Values.queue.sqsRegion -}}
{{- fail "autoscaling.keda needs queue.sqsRegion" -}}
{{- end -}}
{{- range $name, $own := .Values.services -}}
{{- $svc := merge (deepCopy ($own | default dict)) (deepCopy $.Values.serviceDefaults) -}}
{{- if $svc.enabled -}}
{{- $url := include "exaconnect.queue" (dict "root" $root "service" $name "svc" $svc) -}}
{{- if not (regexMatch "^https://sqs\\.[a-z0-9-]+\\.amazonaws\\.com/[0-9]{12}/[A-Za-z0-9_-]{1,80}$" $url) -}}
{{- fail (printf "autoscaling.keda: the queue of %s is %q; KEDA's aws-sqs-queue scaler needs a queue URL, https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (set queue.root to https://sqs.REGION.amazonaws.com/ACCOUNT/PREFIX, not sqs://)" $name $url) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.pipelineJob.enabled -}}
{{- if not (regexMatch "^(/|gs://|s3://|file:///)" .Values.pipelineJob.output) -}}
{{- fail (printf "pipelineJob.output is %q: expected an absolute path on a mounted volume (e.g. /data/pipeline) or a gs:// or s3:// URL; the pod's root filesystem is read-only" .Values.pipelineJob.output) -}}
{{- end -}}
{{- if and (hasPrefix "/data" .Values.pipelineJob.output) (not .Values.persistence.enabled) -}}
{{- fail "pipelineJob.output is under /data but persistence.enabled=false: enable the shared volume or write to gs:// or s3://" -}}
{{- end -}}
{{- end -}}
{{- end -}}
