#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from the pinned Go wrapper modules beside this
# script, into a per-user cache directory keyed by the pinned versions. A warm cache
# (including one filled by an earlier clone of the repository) is reused as is.
#
# Prints the directory holding the binaries on stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=v1.34.4

# The key covers everything that decides the bytes of the binaries.
key=$( (cat "$here"/build.sh "$here"/*/go.mod "$here"/*/go.sum "$here"/etcd/main.go; go env GOVERSION GOARCH) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
bin="$cache_root/controlplane/$k8s_version-$key/bin"

if [ -f "$bin/.complete" ]; then
  echo "$bin"
  exit 0
fi

log() { printf '[controlplane] %s\n' "$*" >&2; }
mkdir -p "$cache_root/controlplane"
tmp=$(mktemp -d "$cache_root/controlplane/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

export CGO_ENABLED=0 GOFLAGS=-mod=readonly
common=(-trimpath)
start=$(date +%s)

stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=34"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy $k8s_version"
(cd "$here/kubernetes" && go build "${common[@]}" -ldflags "-s -w$stamp" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
log "building etcd"
(cd "$here/etcd" && go build "${common[@]}" -ldflags "-s -w" -o "$tmp/etcd" .)
log "building kwok"
(cd "$here/kwok" && go build "${common[@]}" -ldflags "-s -w" -o "$tmp/" sigs.k8s.io/kwok/cmd/kwok)
log "building helm"
(cd "$here/helm" && go build "${common[@]}" -ldflags "-s -w" -o "$tmp/" helm.sh/helm/v3/cmd/helm)

touch "$tmp/.complete"
rm -rf "$bin"
mkdir -p "$(dirname "$bin")"
mv "$tmp" "$bin"
trap - EXIT
log "built in $(( $(date +%s) - start ))s into $bin"
echo "$bin"
