{{/* The release's full name, used for every object the chart makes. */}}
{{- define "keyhaven.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keyhaven.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keyhaven.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "keyhaven.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyhaven.labels" -}}
{{ include "keyhaven.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Namespaces that get a Role on Secrets besides the release's own. */}}
{{- define "keyhaven.secretNamespaces" -}}
{{- $nss := list -}}
{{- if .Values.watchNamespace -}}{{- $nss = append $nss .Values.watchNamespace -}}{{- end -}}
{{- range .Values.secretNamespaces -}}{{- $nss = append $nss . -}}{{- end -}}
{{- without ($nss | uniq) .Release.Namespace | join "," -}}
{{- end -}}
