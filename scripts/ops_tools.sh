#!/usr/bin/env bash
# Installs what the ops checks (scripts/ops_check.sh, tests/test_ops*.py) need, and prints the
# directory that holds the binaries.
#
#   helm, kubeconform     go install from the Go module proxy (pinned versions)
#   promtool, prometheus  Debian's `prometheus` package (apt-get)
#   Kubernetes schemas    the JSON schemas shipped in the kubernetes-validate wheel (PyPI)
#   CRD schemas           ServiceMonitor and PrometheusRule, converted from the CRDs in the
#                         prometheus-operator Go module by kubeconform's openapi2jsonschema.py;
#                         PyTorchJob likewise from the Kubeflow training-operator Go module
#
# Everything lands under $RLHF_CACHE (default ~/.cache/rlhf), keyed by version, so a machine
# builds it once, not once per CI run: building helm takes over a minute on 2 cores.
# Progress goes to stderr; stdout is where things are, as shell assignments for
# eval "$(scripts/ops_tools.sh)":
#   OPS_BIN=...           helm, kubeconform, promtool, prometheus
#   OPS_KUBE_SCHEMAS=...  v<version>-local-strict/ folders, one per version in OPS_KUBE_VERSIONS
#   OPS_CRD_SCHEMAS=...   servicemonitor_v1.json, prometheusrule_v1.json, pytorchjob_v1.json
#   OPS_KUBE_VERSIONS=... the Kubernetes versions to validate against
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
PROMETHEUS_OPERATOR_VERSION=${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}
TRAINING_OPERATOR_VERSION=${TRAINING_OPERATOR_VERSION:-v1.9.3}
# The Kubernetes versions scripts/ops_check.sh validates against: the chart's minimum
# (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.27.0 1.35.0"}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RLHF_CACHE:-$HOME/.cache/rlhf}
bin="$cache/bin"
schemas="$cache/schemas"
mkdir -p "$bin" "$schemas"

fail() {
  echo "error: $*" >&2
  exit 1
}

need_go() {
  command -v go >/dev/null 2>&1 || fail "$1 is missing and 'go' is not installed to fetch it"
}

# go_tool NAME VERSION PACKAGE: installs PACKAGE@VERSION as $bin/NAME unless the cached copy
# is that version (recorded in a stamp file beside it).
go_tool() {
  local name=$1 version=$2 package=$3 stamp="$bin/.$1.version"
  if [ -x "$bin/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    return
  fi
  need_go "$name $version"
  echo "installing $name $version with go install (first run only)" >&2
  local start=$SECONDS
  # From / so that a go.mod in the current directory cannot interfere.
  if ! (cd / && GOBIN="$bin" go install "$package@$version" >&2); then
    fail "could not install $name: 'go install $package@$version' failed"
  fi
  echo "$version" >"$stamp"
  echo "installed $name $version in $((SECONDS - start))s" >&2
}

go_tool helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
go_tool kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 ||
    fail "promtool and prometheus are missing and apt-get is not available to install Debian's 'prometheus' package"
  echo "installing Debian's prometheus package (promtool, prometheus)" >&2
  start=$SECONDS
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  # Only the binaries are used; the package's service is not started in containers.
  if ! { $sudo apt-get update -qq >&2 &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
    fail "could not install promtool: 'apt-get install prometheus' failed"
  fi
  echo "installed the prometheus package in $((SECONDS - start))s" >&2
fi
for tool in promtool prometheus; do
  # Resolved, so that a PATH that already holds $bin cannot make the link point at itself.
  target=$(readlink -f "$(command -v "$tool")")
  [ "$target" = "$bin/$tool" ] || ln -sf "$target" "$bin/$tool"
done

# Kubernetes JSON schemas, one folder per version (v1.27.0-local-strict/deployment-apps-v1.json...):
# kubeconform cannot download its default schemas from here; the kubernetes-validate wheel has
# them. Its files name each other by absolute ids (https://kubernetes.io/api/_definitions.json),
# which kubeconform would try to fetch, so they are rewritten to refer to the sibling file.
kube_dir="$schemas/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
for version in $KUBE_VERSIONS; do
  [ -f "$kube_dir/v$version-local-strict/.complete" ] && continue
  echo "unpacking Kubernetes $version schemas from kubernetes-validate $KUBERNETES_VALIDATE_VERSION" >&2
  wheel_dir="$cache/wheels"
  wheel="$wheel_dir/kubernetes_validate-$KUBERNETES_VALIDATE_VERSION-py3-none-any.whl"
  if [ ! -f "$wheel" ]; then
    python3 -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2 ||
      fail "could not download the Kubernetes schemas: 'pip download kubernetes-validate==$KUBERNETES_VALIDATE_VERSION' failed"
  fi
  python3 - "$wheel" "$kube_dir" "v$version-local-strict" <<'PY' || fail "could not unpack Kubernetes $version schemas from $wheel"
import json
import os
import sys
import zipfile

wheel, dest, folder = sys.argv[1:]
prefix = f"kubernetes_validate/kubernetes-json-schema/{folder}/"
out_dir = os.path.join(dest, folder)
os.makedirs(out_dir, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and m.endswith(".json")]
    if not members:
        sys.exit(f"{folder} is not in {wheel}")
    for member in members:
        schema = json.loads(z.read(member))
        schema.pop("$id", None)
        text = json.dumps(schema).replace('"/api/_definitions.json#', '"_definitions.json#')
        with open(os.path.join(out_dir, member[len(prefix):]), "w") as out:
            out.write(text)
open(os.path.join(out_dir, ".complete"), "w").close()
PY
done

# CRD schemas for kubeconform ({kind}_{version}.json), from the CRDs the prometheus-operator
# module ships, converted by the script kubeconform's module ships for exactly this.
crd_dir="$schemas/crds-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-training-operator-$TRAINING_OPERATOR_VERSION"
module_dir() { (cd / && go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'); }
if [ ! -f "$crd_dir/servicemonitor_v1.json" ] || [ ! -f "$crd_dir/prometheusrule_v1.json" ] ||
  [ ! -f "$crd_dir/pytorchjob_v1.json" ]; then
  need_go "the ServiceMonitor/PrometheusRule/PyTorchJob schemas"
  echo "converting the prometheus-operator $PROMETHEUS_OPERATOR_VERSION and training-operator $TRAINING_OPERATOR_VERSION CRDs to JSON schemas" >&2
  operator=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION") ||
    fail "could not download the prometheus-operator module $PROMETHEUS_OPERATOR_VERSION"
  training=$(module_dir "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION") ||
    fail "could not download the training-operator module $TRAINING_OPERATOR_VERSION"
  kubeconform_src=$(module_dir "github.com/yannh/kubeconform@$KUBECONFORM_VERSION") ||
    fail "could not download the kubeconform module $KUBECONFORM_VERSION"
  # openapi2jsonschema.py needs PyYAML: $OPS_PYTHON, else python3 when it has it, else the
  # project's environment (which has it, but may mean building that environment first).
  python=${OPS_PYTHON:-python3}
  if ! "$python" -c 'import yaml' 2>/dev/null; then
    python=$("$root/scripts/bootstrap.sh")/bin/python
  fi
  mkdir -p "$crd_dir"
  (cd "$crd_dir" && "$python" "$kubeconform_src/scripts/openapi2jsonschema.py" \
    "$operator/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
    "$operator/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
    "$training/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" >&2) ||
    fail "could not convert the CRDs with openapi2jsonschema.py"
fi

echo "OPS_BIN=$bin"
echo "OPS_KUBE_SCHEMAS=$kube_dir"
echo "OPS_CRD_SCHEMAS=$crd_dir"
echo "OPS_KUBE_VERSIONS=\"$KUBE_VERSIONS\""
