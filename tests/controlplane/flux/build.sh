#!/usr/bin/env bash
# Builds Flux's source-controller, kustomize-controller and helm-controller (the releases of
# Flux v2.9.2) from the pinned Go wrapper modules beside this script, and copies their CRDs
# from the same modules, into the per-user control-plane cache keyed by the pinned versions.
# A warm cache (including one filled by an earlier clone of the repository) is reused as is.
#
# Prints the directory on stdout (bin/: the three controllers; crds/: their CRDs); progress
# goes to stderr. `sd35-localcluster start --flux` runs them against the local cluster.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
flux_version=v2.9.2
controllers=(source-controller kustomize-controller helm-controller)

# The key covers everything that decides the bytes of the binaries and the CRDs.
key=$( (cat "$here"/build.sh "$here"/*/go.mod "$here"/*/go.sum; go env GOVERSION GOARCH) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
dir="$cache_root/controlplane/flux-$flux_version-$key"

if [ -f "$dir/.complete" ]; then
  echo "$dir"
  exit 0
fi

log() { printf '[flux] %s\n' "$*" >&2; }
mkdir -p "$cache_root/controlplane"
tmp=$(mktemp -d "$cache_root/controlplane/.build-flux-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/crds"

# GOTOOLCHAIN=local: the modules ask for Go 1.26.0, and a newer go directive must fail here
# rather than download another toolchain.
export CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local
start=$(date +%s)
for controller in "${controllers[@]}"; do
  module=github.com/fluxcd/$controller
  version=$(cd "$here/$controller" && go list -m -f '{{.Version}}' "$module")
  log "building $controller $version"
  (cd "$here/$controller" && go build -trimpath -ldflags "-s -w" -o "$tmp/bin/$controller" "$module")
  # The module's own CRDs (config/crd/bases), the ones its release manifests carry.
  source=$(cd "$here/$controller" && go list -m -f '{{.Dir}}' "$module")
  cp "$source"/config/crd/bases/*.yaml "$tmp/crds/"
  chmod u+w "$tmp"/crds/*.yaml
done

touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
log "built in $(( $(date +%s) - start ))s into $dir"
echo "$dir"
