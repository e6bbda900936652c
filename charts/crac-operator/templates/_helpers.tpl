{{/* Labels every object of the chart carries. */}}
{{- define "crac.labels" -}}
app.kubernetes.io/part-of: crac-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The image of a component: crac.image (dict "root" $ "name" "crac-operator"). */}}
{{- define "crac.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end }}

{{/* Pod-level security: no root, the runtime's default seccomp profile. */}}
{{- define "crac.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security: read-only root, no capabilities, no privilege escalation. */}}
{{- define "crac.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Name of a cluster-scoped object (ClusterRole, binding, ValidatingAdmissionPolicy):
the component's name and the release namespace, so two installs (one per namespace, with
operator.watchNamespace) do not fight over one object. crac.clusterName (dict "root" $ "name" "crac-operator"). */}}
{{- define "crac.clusterName" -}}
{{- printf "%s.%s" .name .root.Release.Namespace -}}
{{- end }}

{{/* The activator's user name, as the API server sees its requests. */}}
{{- define "crac.activatorUser" -}}
{{- printf "system:serviceaccount:%s:crac-activator" .Release.Namespace -}}
{{- end }}

{{/* A list of strings as the elements of a CEL list: 'A', 'B'. */}}
{{- define "crac.celStrings" -}}
{{- $out := list }}
{{- range . }}{{ $out = append $out (printf "'%s'" .) }}{{ end }}
{{- join ", " $out }}
{{- end }}

{{/* Affinity preferring the replicas of a component on different nodes, then zones (a
preference: a one-node cluster still runs them all). crac.spreadReplicas (dict "root" $ "name" "crac-activator"). */}}
{{- define "crac.spreadReplicas" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    {{- range $key, $weight := dict "kubernetes.io/hostname" 100 "topology.kubernetes.io/zone" 50 }}
    - weight: {{ $weight }}
      podAffinityTerm:
        topologyKey: {{ $key }}
        labelSelector:
          matchLabels:
            app.kubernetes.io/name: {{ $.name }}
            app.kubernetes.io/instance: {{ $.root.Release.Name }}
    {{- end }}
{{- end }}

{{/* Egress rules every component needs: the API server and DNS. The API server's address
is not a pod a selector can name and differs per cluster, and CNIs differ in whether a policy
sees the kubernetes Service's port (443) or the API server's (often 6443): both ports, to any
address (networkPolicy.apiServerPorts). DNS: port 53 to any address (kube-dns, or a
node-local cache on a link-local address). */}}
{{- define "crac.apiServerAndDnsEgress" -}}
# The API server.
- ports:
    {{- range .Values.networkPolicy.apiServerPorts }}
    - { protocol: TCP, port: {{ . }} }
    {{- end }}
# DNS.
- ports:
    - { protocol: UDP, port: 53 }
    - { protocol: TCP, port: 53 }
{{- end }}
