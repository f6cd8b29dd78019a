#!/usr/bin/env bash
# Builds `argocd-health` (the Go program beside this script, which runs SD35Deployment health
# checks through Argo CD's own settings, Lua and gitops-engine code at the pinned version) into
# a per-user cache directory keyed by the pinned versions; a warm cache (from any clone) is
# reused as is.
#
# Prints the path of the binary on stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
key=$( (cat "$here"/build.sh "$here"/health/go.mod "$here"/health/go.sum "$here"/health/main.go; go env GOVERSION GOARCH) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
dir="$cache_root/argocd/health-$key"

if [ -f "$dir/.complete" ]; then
  echo "$dir/argocd-health"
  exit 0
fi

mkdir -p "$cache_root/argocd"
tmp=$(mktemp -d "$cache_root/argocd/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
printf '[argocd] building argocd-health (Argo CD %s)\n' \
  "$(cd "$here/health" && go list -m -f '{{.Version}}' github.com/argoproj/argo-cd/v3)" >&2
(cd "$here/health" && CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local \
  go build -trimpath -ldflags "-s -w" -o "$tmp/argocd-health" .)
touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
printf '[argocd] built in %ss into %s\n' "$(( $(date +%s) - start ))" "$dir" >&2
echo "$dir/argocd-health"
