#!/usr/bin/env bash
# Installs what `make demo` and `make test` need and this machine lacks, before any long build
# starts, so a missing piece is fixed (or named) in the first minute. `make demo`, `make test`
# and `.ci/run` all run it first; run it by hand the same way:
#
#   tools/install-deps.sh demo   the real node and its images: Debian packages only
#   tools/install-deps.sh test   everything `make test` runs: the above, plus Chromium, Python's
#                                venv and pip, rustfmt and clippy, the nightly toolchain with
#                                cargo-fuzz, and the Python test environment (tools/python-env.sh)
#
# Debian packages need root: as root they are installed with apt-get; anyone else gets one line
# naming the command to run as root, and the script stops there (exit 1) when `make test` or
# `make demo` could not pass without them. The Rust toolchains and the Python environment are
# per user and are installed for whoever runs it. Go (1.26 or later) and Cargo must already be
# on the PATH: they build everything else. Prints nothing more than a line per thing it installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=${1:-test}
case "$target" in demo | test) ;; *) echo "usage: $0 demo|test" >&2; exit 2 ;; esac
log() { printf '[install] %s\n' "$*" >&2; }
has() { command -v "$1" >/dev/null 2>&1; }
root=false
[ "$(id -u)" = 0 ] && root=true

# The toolchains that build everything else cannot come from here.
has cargo || { log "Cargo is missing: install Rust with rustup (https://rustup.rs), then run make again"; exit 1; }
has go || { log "Go is missing: install Go 1.26 or later (https://go.dev/dl), then run make again"; exit 1; }
go_minor=$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
if [ "${go_minor:-0}" -lt 26 ]; then
  log "$(go env GOVERSION) is too old: the control plane's modules need Go 1.26 or later"
  exit 1
fi

# Debian packages, each with what needs it. The real node (make demo, the real-node and Flux
# tests as root) runs containerd, runc, the CNI plugins, iptables and conntrack (kube-proxy),
# and setpriv/nsenter/unshare (util-linux); buildah and mmdebstrap build its images from
# Debian's packages and cc compiles its pause binary; the Flux tests serve their fleet
# repository with git's http-backend.
packages=()      # missing, by package name
needed_now=()    # the subset that a run by this user cannot do without
need() { # need PACKAGE CHECK... ; CHECK is a command that succeeds when PACKAGE is there
  local package=$1
  shift
  "$@" >/dev/null 2>&1 && return 0
  packages+=("$package")
}
check_packages() { # fills packages[] with what is missing
  need util-linux has setpriv
  need containerd has containerd
  need runc has runc
  need containernetworking-plugins test -x /usr/lib/cni/bridge -o -x /opt/cni/bin/bridge
  need iptables has iptables
  need conntrack has conntrack
  need iproute2 has ip
  need buildah has buildah
  need mmdebstrap has mmdebstrap
  need gcc has cc
  need libc6-dev test -e /usr/include/stdio.h
  need curl has curl
  need git has git
  if [ "$target" = test ]; then
    # Chromium drives the server playground's browser test; the Python test clients live in a
    # venv; the CUDA build (make cuda) installs its pinned toolchain with pip.
    need chromium has chromium
    need python3-venv python3 -c 'import ensurepip, venv'
    need python3-pip python3 -m pip --version
  fi
}
check_packages
if [ "$root" = false ]; then
  # Without root the real node, its images and the Flux tests skip, so only these matter now.
  for package in "${packages[@]}"; do
    case "$package" in util-linux | gcc | libc6-dev | git | chromium | python3-venv | python3-pip) needed_now+=("$package") ;; esac
  done
fi
if [ "${#packages[@]}" -gt 0 ]; then
  command="apt-get update && apt-get install -y ${packages[*]}"
  if [ "$root" = true ]; then
    log "installing Debian packages: ${packages[*]}"
    started=$(date +%s)
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"; } \
        >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      rm -f "$apt_log"
      log "apt-get failed (its output is above); fix that, then run make again"
      exit 1
    fi
    rm -f "$apt_log"
    log "installed in $(( $(date +%s) - started ))s"
    # What apt-get could not provide (a command installed somewhere off the PATH, say) stops
    # the run here rather than in the middle of the tests.
    installed=("${packages[@]}")
    packages=()
    check_packages
    if [ "${#packages[@]}" -gt 0 ]; then
      log "still missing after apt-get install ${installed[*]}: ${packages[*]}"
      exit 1
    fi
  elif [ "${#needed_now[@]}" -gt 0 ]; then
    log "missing Debian packages; as root, run: $command"
    exit 1
  else
    log "as root, run: $command (without them the real-node and Flux tests skip, as they do for non-root users)"
  fi
fi

# Per-user Rust pieces: rustfmt and clippy (make lint), the nightly toolchain and cargo-fuzz
# (make fuzz).
if [ "$target" = test ]; then
  if has rustup; then
    for component in rustfmt clippy; do
      if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        log "installing the $component component (rustup)"
        rustup component add "$component" >/dev/null 2>&1
      fi
    done
    if ! cargo +nightly --version >/dev/null 2>&1; then
      log "installing the nightly toolchain (rustup, minimal profile) for make fuzz"
      rustup toolchain install nightly --profile minimal >/dev/null 2>&1
    fi
  elif ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    log "rustfmt or clippy is missing and there is no rustup to add them: install Rust with rustup"
    exit 1
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz 0.13.1 (cargo install, about two minutes) for make fuzz"
    cargo install -q cargo-fuzz --locked --version 0.13.1
  fi
  # The Python test clients' venv (a no-op once it exists).
  bash tools/python-env.sh >/dev/null
fi
