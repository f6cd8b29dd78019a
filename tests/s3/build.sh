#!/usr/bin/env bash
# Builds the S3-compatible server the artifact-storage tests run (SeaweedFS's `weed`, from the
# pinned Go wrapper module beside this script) into a per-user cache directory keyed by the
# pinned versions; a warm cache (from any clone) is reused as is.
#
# Prints the path of the `weed` binary on stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
key=$( (cat "$here"/build.sh "$here"/seaweedfs/go.mod "$here"/seaweedfs/go.sum; go env GOVERSION GOARCH) | sha256sum | cut -c1-16)
cache_root="${SD35_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sd35-operator}"
dir="$cache_root/s3/seaweedfs-$key"

if [ -f "$dir/.complete" ]; then
  echo "$dir/weed"
  exit 0
fi

mkdir -p "$cache_root/s3"
tmp=$(mktemp -d "$cache_root/s3/.build-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
printf '[s3] building the SeaweedFS server (weed)\n' >&2
(cd "$here/seaweedfs" && CGO_ENABLED=0 GOFLAGS=-mod=readonly \
  go build -trimpath -ldflags "-s -w" -o "$tmp/weed" github.com/seaweedfs/seaweedfs/weed)
touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
printf '[s3] built in %ss into %s\n' "$(( $(date +%s) - start ))" "$dir" >&2
echo "$dir/weed"
