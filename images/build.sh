#!/usr/bin/env bash
# Builds the project's container images without a Docker engine: buildah builds the
# repository's Dockerfiles on a base image made here from Debian's packages (mmdebstrap),
# and writes each image as an archive that `ctr images import`, `docker load` or
# `podman load` takes.
#
#   images/build.sh [--profile dev|release] [--build host|container] [--out DIR]
#
#   --profile    cargo profile of the binaries (default release)
#   --build      host (default): cargo builds the binaries here, the Dockerfiles copy them;
#                container: the Dockerfiles' build stages compile them (hermetic, slower)
#   --out        where the archives go (default target/images)
#
# Images ($REGISTRY and $VERSION from the environment, as the Makefile sets them):
#   $REGISTRY/sd35-operator:$VERSION       operator/Dockerfile
#   $REGISTRY/sd35-server:$VERSION-cpu     inference/server/Dockerfile, target cpu
#   localhost/sd35/pause:1                 images/pause/: the local node's pod sandbox image
# Bases, built once and kept in buildah's storage:
#   localhost/sd35/runtime:bookworm-KEY    libc6, libgcc-s1, base-files, netbase; user 65532
#   localhost/sd35/rust:VERSION-KEY        --build container only: Debian's C toolchain plus
#                                          the Rust toolchain this host builds with
# Prints the output directory on stdout; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
profile=release
build=host
out="$root/target/images"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$profile" in dev) profile_dir=debug ;; *) profile_dir=$profile ;; esac
case "$build" in host | container) ;; *) echo "--build is host or container" >&2; exit 2 ;; esac

registry=${REGISTRY:-ghcr.io/sd35-operator}
version=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
pause_image=localhost/sd35/pause:1

log() { printf '[images] %s\n' "$*" >&2; }
need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "$1 is missing: apt-get install $2 (as .ci/run does)" >&2
    exit 1
  }
}
need buildah buildah
need mmdebstrap mmdebstrap
need cc gcc
if [ "$(id -u)" != 0 ]; then
  echo "building images needs root here (buildah's rootless mode needs subuid ranges)" >&2
  exit 1
fi
exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
start=$(date +%s)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The runtime base: what distroless/cc has (glibc, libgcc, /etc/passwd with nonroot 65532),
# unpacked from Debian's packages without running their scripts, so no shell or package
# manager ends up in it. TLS roots are compiled into the binaries (webpki-roots).
runtime_packages=libc6,libgcc-s1,base-files,netbase,tzdata
runtime_hook='printf "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n" >"$1/etc/passwd"; printf "root:x:0:\nnonroot:x:65532:\n" >"$1/etc/group"; mkdir -p "$1/home/nonroot" "$1/tmp"; chown 65532:65532 "$1/home/nonroot"; chmod 1777 "$1/tmp"; rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/lintian" "$1/var/lib/apt" "$1/var/cache/apt" "$1/var/log"/*'
runtime_key=$(printf '%s\n' "$suite" "$runtime_packages" "$runtime_hook" | sha256sum | cut -c1-12)
runtime_image=localhost/sd35/runtime:$suite-$runtime_key
if ! exists "$runtime_image"; then
  log "making $runtime_image from Debian $suite's packages ($runtime_packages)"
  mmdebstrap --quiet --mode=root --variant=extract --include="$runtime_packages" \
    --customize-hook="$runtime_hook" "$suite" "$work/runtime.tar" "$mirror" >&2
  container=$(buildah from scratch)
  buildah add --quiet "$container" "$work/runtime.tar" / >/dev/null
  buildah config --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/bin:/usr/bin:/bin --env SSL_CERT_DIR=/etc/ssl/certs \
    --label org.opencontainers.image.description="Debian $suite runtime base: glibc, libgcc" \
    "$container"
  buildah commit --quiet --rm --timestamp 0 "$container" "$runtime_image" >/dev/null
  rm -f "$work/runtime.tar"
fi

build_args=(--build-arg "RUNTIME_IMAGE=$runtime_image" --build-arg "BUILD=$build"
  --build-arg "PROFILE=$profile_dir")
if [ "$build" = host ]; then
  log "cargo build --profile $profile: sd35-operator, sd35-server"
  (cd "$root" && cargo build --locked --profile "$profile" -q \
    -p sd35-operator --bin sd35-operator -p sd35-server --bin sd35-server)
else
  # The build stages compile inside a Rust image: Debian's C toolchain and this host's Rust
  # toolchain (the registry has no image to pull). cargo downloads crates from inside the
  # build; a CA bundle for a TLS-intercepting proxy is handed in as a build secret.
  sysroot=$(rustc --print sysroot)
  rust_version=$(rustc --version | cut -d' ' -f2)
  builder_packages=gcc,libc6-dev,pkg-config,ca-certificates
  rust_key=$(printf '%s\n' "$suite" "$builder_packages" "$(rustc -vV)" | sha256sum | cut -c1-12)
  rust_image=localhost/sd35/rust:$rust_version-$rust_key
  if ! exists "$rust_image"; then
    log "making $rust_image: Debian $suite ($builder_packages) + Rust $rust_version"
    mmdebstrap --quiet --mode=root --variant=minbase --include="$builder_packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      "$suite" "$work/builder.tar" "$mirror" >&2
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$work/builder.tar" / >/dev/null
    buildah copy --quiet "$container" "$sysroot/bin/cargo" "$sysroot/bin/rustc" /usr/local/rust/bin/ >/dev/null
    buildah copy --quiet "$container" "$sysroot/lib" /usr/local/rust/lib >/dev/null
    buildah config --env CARGO_HOME=/usr/local/cargo \
      --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      "$container"
    buildah commit --quiet --rm "$container" "$rust_image" >/dev/null
    rm -f "$work/builder.tar"
  fi
  build_args+=(--build-arg "RUST_IMAGE=$rust_image")
  ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  [ -f "$ca" ] && build_args+=(--secret "id=ca-bundle,src=$ca")
fi

# Build steps never get a network of their own: buildah's would add a bridge, firewall rules
# and forwarding to the host. Only the container build's cargo needs the registry, through
# the host's network.
network=none
[ "$build" = container ] && network=host
bud() { buildah bud --quiet --layers --network="$network" --timestamp 0 "$@" >/dev/null; }

log "building $pause_image"
mkdir -p "$work/pause"
cc -Os -static -Wall -Wextra -Werror -o "$work/pause/pause" "$root/images/pause/pause.c"
strip "$work/pause/pause"
bud -f "$root/images/pause/Dockerfile" -t "$pause_image" "$work/pause"

operator_image=$registry/sd35-operator:$version
server_image=$registry/sd35-server:$version-cpu
log "building $operator_image"
bud "${build_args[@]}" -f "$root/operator/Dockerfile" -t "$operator_image" "$root"
log "building $server_image"
bud "${build_args[@]}" --target cpu -f "$root/inference/server/Dockerfile" -t "$server_image" "$root"

# Each binary must start in its image: a host newer than the runtime base's glibc shows here.
for check in "$operator_image sd35-operator" "$server_image sd35-server"; do
  set -- $check
  container=$(buildah from --quiet "$1")
  if ! buildah run --network=none "$container" -- "/usr/local/bin/$2" --version >/dev/null; then
    buildah rm "$container" >/dev/null
    echo "$2 does not run in $1: build on Debian $suite or use --build container" >&2
    exit 1
  fi
  buildah rm "$container" >/dev/null
done

for entry in "pause $pause_image" "sd35-operator $operator_image" "sd35-server-cpu $server_image"; do
  set -- $entry
  rm -f "$out/$1.tar"
  buildah push --quiet "$2" "docker-archive:$out/$1.tar:$2" >/dev/null
done
# What the archives hold, for the cluster harness and `make demo`.
printf 'operator=%s\nserver=%s\npause=%s\n' "$operator_image" "$server_image" "$pause_image" >"$out/images.env"
log "built in $(( $(date +%s) - start ))s: $operator_image, $server_image, $pause_image → $out"
echo "$out"
