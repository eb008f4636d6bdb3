#!/usr/bin/env bash
# Checks the deployment artefacts with the real tools (installed by scripts/ops_tools.sh):
#
#   1. helm lint --strict, default values and helm/rlhf/ci/all-features-values.yaml
#   2. helm template for both and for helm/rlhf/ci/multinode-values.yaml (the trainer as a
#      Kubeflow PyTorchJob), for every Kubernetes version in OPS_KUBE_VERSIONS (the chart's
#      minimum and a recent one), validated by kubeconform -strict against that version's
#      schemas; ServiceMonitor, PrometheusRule and PyTorchJob against their CRD schemas
#   3. promtool check rules and promtool test rules on the alert rules
#
# Exits non-zero at the first failure. Rendered manifests are kept in $OPS_OUT when set.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
eval "$("$root/scripts/ops_tools.sh")"
export PATH="$OPS_BIN:$PATH"

chart="$root/helm/rlhf"
all_features="$chart/ci/all-features-values.yaml"
multinode="$chart/ci/multinode-values.yaml"
rules="$root/deploy/prometheus/alerts.yaml"
rules_test="$root/deploy/prometheus/alerts_test.yaml"
out=${OPS_OUT:-$(mktemp -d)}
[ -n "${OPS_OUT:-}" ] || trap 'rm -rf "$out"' EXIT
mkdir -p "$out"

echo "== tools: $(helm version --short), kubeconform $(cat "$OPS_BIN/.kubeconform.version"), $(promtool --version 2>&1 | head -1)"

min_version=${OPS_KUBE_VERSIONS%% *}
echo "== helm lint (default values)"
helm lint --strict --kube-version "$min_version" "$chart"
echo "== helm lint (all features on)"
helm lint --strict --kube-version "$min_version" -f "$all_features" "$chart"
echo "== helm lint (trainer over several nodes)"
helm lint --strict --kube-version "$min_version" -f "$multinode" "$chart"

# Strimzi publishes its CRDs only as release assets and in its Helm chart repository, neither
# of which is a package registry this machine reaches (the io.strimzi:api jar on Maven Central
# holds the Java model, not the CRD), so KafkaTopic is not schema-checked here.
echo "== kubeconform: skipping KafkaTopic (kafka.strimzi.io/v1beta2): no registry reachable from here ships Strimzi's CRD schema"
for version in $OPS_KUBE_VERSIONS; do
  for values in default all-features multinode; do
    manifest="$out/$values-k8s-$version.yaml"
    args=(template rlhf "$chart" --namespace rlhf --kube-version "$version")
    [ "$values" = all-features ] && args+=(-f "$all_features")
    [ "$values" = multinode ] && args+=(-f "$multinode")
    echo "== helm template ($values values, Kubernetes $version) | kubeconform -strict"
    helm "${args[@]}" >"$manifest"
    kubeconform -strict -summary -kubernetes-version "$version" \
      -schema-location "$OPS_KUBE_SCHEMAS/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
      -schema-location "$OPS_CRD_SCHEMAS/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
      -skip KafkaTopic \
      "$manifest"
  done
done

echo "== promtool check rules"
promtool check rules "$rules"
echo "== promtool test rules"
promtool test rules "$rules_test"
echo "== ops checks passed"
