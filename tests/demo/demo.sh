#!/usr/bin/env bash
# `make demo` and `make demo-stop`: the local cluster with its real node, the chart's operator
# running as a pod there, the GPU example going Ready on the kwok GPU nodes, and the tiny
# model served for real on the real node, ending with a PNG made through the Service.
#
#   tests/demo/demo.sh start    everything above; leaves it running
#   tests/demo/demo.sh stop     stops it and restores the host
#
# Needs root (the real node runs containerd and the kubelet). The PNG goes to
# target/demo/sd35-tiny.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$PWD
localcluster=$root/target/debug/sd35-localcluster
png=$root/target/demo/sd35-tiny.png
demo_namespace=sd35-demo
operator_namespace=sd35-system
forward_port=${DEMO_PORT:-18080}

log() { printf '\n[demo] %s\n' "$*" >&2; }

stop() {
  [ -x "$localcluster" ] || { echo "nothing to stop (no $localcluster)"; return 0; }
  local state
  if state=$(dirname "$("$localcluster" kubeconfig 2>/dev/null)"); then
    if [ -f "$state/mirror.pid" ]; then kill "$(cat "$state/mirror.pid")" 2>/dev/null || true; fi
  fi
  "$localcluster" stop
}

start() {
  if [ "$(id -u)" != 0 ]; then
    echo "make demo runs a real node (containerd, the kubelet, a network namespace): run it as root" >&2
    exit 1
  fi
  started=$(date +%s)
  bin=$(bash tests/controlplane/build.sh)
  export PATH="$bin:$PATH"
  log "building sd35-localcluster, sd35-operator and sd35-server, and their images"
  cargo build --locked -q -p sd35-e2e --bin sd35-localcluster \
    -p sd35-operator --bin sd35-operator -p sd35-server --bin sd35-server
  images=$(REGISTRY="${REGISTRY:-ghcr.io/sd35-operator}" VERSION="${VERSION:-}" \
    bash images/build.sh --profile dev)
  # operator=..., server=..., pause=...
  # shellcheck disable=SC1091
  source "$images/images.env"

  log "starting the local cluster: kwok GPU nodes and the real node real-0"
  "$localcluster" start --real-node --images "$images"
  export KUBECONFIG
  KUBECONFIG=$("$localcluster" kubeconfig)
  state=$(dirname "$KUBECONFIG")

  log "installing the chart: the operator as a pod on real-0, Pod Security 'restricted'"
  for namespace in "$operator_namespace" "$demo_namespace"; do
    kubectl create namespace "$namespace" >/dev/null
    kubectl label namespace "$namespace" pod-security.kubernetes.io/enforce=restricted \
      pod-security.kubernetes.io/enforce-version=latest >/dev/null
  done
  helm install sd35 charts/sd35-operator --namespace "$operator_namespace" \
    --values charts/sd35-operator/ci/local-node-values.yaml \
    --set image.repository="${operator%:*}" --set image.tag="${operator##*:}" \
    --set serverImage.repository="${server%:*}" --set serverImage.tag="${server##*:}" \
    --wait --timeout 180s >/dev/null

  log "applying the GPU example (kwok GPU nodes) and the tiny model (real-0)"
  kubectl create secret generic hf-token --from-literal=token=hf_demo >/dev/null
  kubectl apply -f examples/large-bf16.yaml
  nohup "$localcluster" mirror --model inference/testdata/sd35-tiny-large --dir "$state/mirror" \
    >"$state/logs/mirror.log" 2>&1 &
  echo $! >"$state/mirror.pid"
  for _ in $(seq 100); do grep -q '^serving ' "$state/logs/mirror.log" && break; sleep 0.1; done
  mirror=$(sed -n 's/^serving //p' "$state/logs/mirror.log")
  [ -n "$mirror" ] || { cat "$state/logs/mirror.log" >&2; exit 1; }
  kubectl apply --namespace "$demo_namespace" -f - <<EOF
apiVersion: sd35.io/v1alpha1
kind: SD35Deployment
metadata:
  name: tiny
spec:
  variant: large
  precision: bf16
  model:
    source:
      http:
        url: "$mirror"
  cache:
    size: 1Gi
  server:
    gpu:
      count: 0
    resources: {requests: {cpu: 100m, memory: 256Mi}, limits: {memory: 2Gi}}
  scheduling:
    nodeSelector: {kubernetes.io/hostname: real-0}
    tolerations: [{key: sd35.io/real-node, operator: Exists, effect: NoSchedule}]
EOF
  for object in "default sd35-large" "$demo_namespace tiny"; do
    set -- $object
    kubectl wait --namespace "$1" --for=jsonpath='{.status.phase}'=Ready "sd35/$2" --timeout=300s
  done
  kubectl get nodes -o wide -L nvidia.com/gpu.product
  kubectl get sd35 --all-namespaces
  kubectl get pods --all-namespaces -o wide --field-selector spec.nodeName=real-0

  log "asking the tiny model for a picture through the Service (kubectl port-forward)"
  kubectl port-forward --namespace "$demo_namespace" service/tiny "$forward_port:8080" \
    >"$state/logs/port-forward.log" 2>&1 &
  forward=$!
  for _ in $(seq 100); do grep -q '^Forwarding' "$state/logs/port-forward.log" && break; sleep 0.1; done
  mkdir -p "$(dirname "$png")"
  body='{"prompt": "a lighthouse at dusk", "seed": 7, "steps": 8, "width": 256, "height": 256}'
  curl_command="curl -sS -X POST http://127.0.0.1:$forward_port/v1/txt2img -H 'content-type: application/json' -d '$body' -o $png"
  curl -sS --fail -X POST "http://127.0.0.1:$forward_port/v1/txt2img" \
    -H 'content-type: application/json' -d "$body" -o "$png"
  kill "$forward"
  file "$png" 2>/dev/null || ls -l "$png"

  cat <<EOF

The local cluster keeps running ($(( $(date +%s) - started ))s to here): kwok GPU nodes where the GPU
example is Ready (their pods run no processes), and the real node real-0 where the operator,
the tiny model's fetch and build Jobs and its server ran for real.

The PNG: $png
(The tiny model's weights are random, so the picture is structured noise: the same path with
real weights and a GPU draws the prompt.) It came from:
  kubectl port-forward --namespace $demo_namespace service/tiny $forward_port:8080 &
  $curl_command

Try:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl get sd35 -A; kubectl describe sd35 -n $demo_namespace tiny; kubectl logs -n $operator_namespace deploy/sd35-sd35-operator
Stop it with: make demo-stop
EOF
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
