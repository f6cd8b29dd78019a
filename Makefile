# Two commands a newcomer needs: `make demo` and `make test`. Everything else is a helper.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Where `make images` tags the images, and with which version (the workspace's).
REGISTRY ?= ghcr.io/sd35-operator
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# GPU generation the server's CUDA kernels are compiled for (see inference/server/Dockerfile).
CUDA_COMPUTE_CAP ?= 80
# Cargo profile of the binaries `make images` packages: release for images to publish; the
# demo and the tests package the dev build they run, so nothing compiles twice.
IMAGE_PROFILE ?= release
# Where the control plane binaries live (built once per version into a per-user cache).
CONTROLPLANE_BIN = $(shell bash tests/controlplane/build.sh)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install what `make test` needs and this machine lacks (as root: Debian packages); `make test` and `make demo` run it first
	@bash tools/install-deps.sh test

.PHONY: controlplane
controlplane: ## Build etcd, kube-apiserver, controller-manager, scheduler, kubectl, kwok, helm (cached)
	@bash tests/controlplane/build.sh

.PHONY: flux
flux: ## Build Flux's source-, kustomize- and helm-controller from pinned Go modules (cached), for `sd35-localcluster start --flux`
	@bash tests/controlplane/flux/build.sh

.PHONY: lint
lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: unit
unit: ## Tests that need no cluster: unit, snapshot, parity, drift and server tests; parity again on the GPU's op graph
	SD35_PYTHON="$$(bash tools/python-env.sh)" $(CARGO) test --locked
	SD35_GENERIC_OPS=1 SD35_OP_CHUNK_ELEMENTS=2048 $(CARGO) test --locked -p sd35-pipeline --lib --test parity --test edit_parity --test lora_parity --test controlnet_parity --test controlnet_sampling

.PHONY: fuzz
fuzz: ## Fuzz request parsing and validation for FUZZ_SECONDS (60) from the committed corpus (nightly, cargo-fuzz)
	bash tools/fuzz.sh

.PHONY: loadcheck
loadcheck: ## Overload, slow clients and SIGTERM against the server on the tiny model; prints the figures
	$(CARGO) build --locked -q -p sd35-server --bin sd35-server -p sd35-http --bin sd35-loadcheck
	./target/debug/sd35-loadcheck --server target/debug/sd35-server --model inference/testdata/sd35-tiny-large

.PHONY: e2e
e2e: ## End-to-end tests on a real local control plane with kwok GPU nodes, the real node real-0 and Flux
	bin="$$(bash tests/controlplane/build.sh)"; \
	argocd="$$(bash tests/argocd/build.sh)"; \
	$(CARGO) build --locked -q -p sd35-operator --bin sd35-operator -p sd35-server --bin sd35-server \
	  -p sd35-e2e --bin sd35-localcluster; \
	flux=""; \
	if [ "$$(id -u)" = 0 ]; then \
	  if ./target/debug/sd35-localcluster kubeconfig >/dev/null 2>&1; then \
	    echo "e2e: the demo's cluster (make demo) holds this machine's real node; stopping it first (make demo-stop)"; \
	    bash tests/demo/demo.sh stop >/dev/null; \
	  fi; \
	  REGISTRY=$(REGISTRY) VERSION=$(VERSION) bash images/build.sh --profile dev >/dev/null; \
	  flux="$$(bash tests/controlplane/flux/build.sh)"; \
	else echo "e2e: not root, so no images and the real-node and Flux tests skip"; fi; \
	SD35_CONTROLPLANE_BIN="$$bin" SD35_OPERATOR_BIN="$$PWD/target/debug/sd35-operator" \
	  SD35_SERVER_BIN="$$PWD/target/debug/sd35-server" SD35_IMAGES_DIR="$$PWD/target/images" \
	  SD35_FLUX_DIR="$$flux" SD35_ARGOCD_HEALTH="$$argocd" \
	  $(CARGO) test --locked -p sd35-e2e

.PHONY: test
test: install controlplane lint unit fuzz cuda device-bench-dry-run e2e ## Everything CI runs (cuda: the CUDA build, checked without a GPU; device-bench-dry-run: the GPU benchmark on the CPU with that build; e2e checks its image)

.PHONY: crds
crds: ## Regenerate the CRD YAML (crds/, the chart) and docs/api.md from the Rust types
	$(CARGO) run -q -p sd35-crds --bin crdgen -- --write

.PHONY: images
images: ## Build the operator and CPU server images with buildah (no Docker) into target/images/*.tar
	REGISTRY=$(REGISTRY) VERSION=$(VERSION) bash images/build.sh --profile $(IMAGE_PROFILE)

.PHONY: images-cuda
images-cuda: cuda ## Build the CUDA server image with buildah from `make cuda`'s binary (needs NVIDIA's CUDA runtime image from a registry)
	buildah bud --layers --target cuda --build-arg BUILD=host \
	  -f inference/server/Dockerfile -t $(REGISTRY)/sd35-server:$(VERSION) .

.PHONY: chart
chart: ## Lint and render the Helm chart with every ci/ scenario
	helm="$$(bash tests/controlplane/build.sh)/helm"; \
	for values in charts/sd35-operator/ci/*-values.yaml; do \
	  "$$helm" lint --strict --kube-version 1.34.0 charts/sd35-operator -f "$$values"; \
	  "$$helm" template sd35 charts/sd35-operator --kube-version 1.34.0 -f "$$values" >/dev/null; \
	done

.PHONY: demo
demo: ## Local cluster with GPU nodes and a real node; the chart's operator; a GPU example Ready and a PNG from the tiny model
	@bash tools/install-deps.sh demo
	bash tests/demo/demo.sh start

.PHONY: bench-operator
bench-operator: ## Operator benchmark: N SD35Deployments to Ready, requests per object, RSS, CPU
	bin="$$(bash tests/controlplane/build.sh)"; \
	$(CARGO) build --locked -q --release -p sd35-operator --bin sd35-operator; \
	$(CARGO) build --locked -q -p sd35-e2e --bin sd35-bench-operator --bin sd35-localcluster; \
	SD35_CONTROLPLANE_BIN="$$bin" SD35_OPERATOR_BIN="$$PWD/target/release/sd35-operator" \
	  ./target/debug/sd35-bench-operator --objects $${OBJECTS:-100,500} $${BENCH_ARGS:-}

.PHONY: cuda
cuda: ## Build sd35-server with CUDA here, no GPU needed (pinned CUDA 13.0 wheels, cached per user)
	@CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) bash tools/cuda/build.sh

.PHONY: bench-cpu
bench-cpu: ## CPU benchmark: our pipeline and diffusers side by side (reference venv, THREADS=2)
	$(CARGO) build --locked -q --release -p sd35-server
	"$${SD35_REFERENCE_PYTHON:-$$HOME/.cache/sd35-reference/bin/python}" inference/reference/benchmark.py \
	  --threads $${THREADS:-2}

.PHONY: bench-adapters
bench-adapters: ## What a LoRA adds to a request: SD3.5 Medium (published shapes, random weights) on the CPU without and with a rank-16 LoRA, alternating (RUNS=2)
	bash tools/bench-adapters.sh

.PHONY: bench-kernels
bench-kernels: ## CPU kernels side by side: sgemm, the block's linears, fused vs unfused attention, then torch's (THREADS=2)
	RAYON_NUM_THREADS=$${THREADS:-2} $(CARGO) bench --locked -q -p sd35-pipeline --bench cpu_kernels
	"$${SD35_REFERENCE_PYTHON:-$$HOME/.cache/sd35-reference/bin/python}" inference/reference/torch_kernel_times.py \
	  --threads $${THREADS:-2}

.PHONY: check-full-size
check-full-size: ## SD3.5 at its published shapes, random weights, on the CPU: mirror, fetch, bf16 and fp8 engines, one image each; load time and peak RSS beside the memory plan (VARIANTS="medium large"; needs twice the weights free on disk: 35 GB Medium, 58 GB Large)
	CARGO=$(CARGO) bash tools/check-full-size.sh $${VARIANTS:-medium large}

.PHONY: device-bench
device-bench: ## Build and pack the GPU benchmark's bundle (target/device-bench, carried to the GPU machine, which runs tools/device-bench.sh)
	bash tools/device-bench.sh --prepare

.PHONY: device-bench-dry-run
device-bench-dry-run: ## The GPU benchmark's whole script on the CPU, small shapes, with the bundle it carries (checked to fit 64 MiB)
	bash tools/device-bench.sh --dry-run

.PHONY: demo-stop
demo-stop: ## Stop the demo cluster and restore the host
	bash tests/demo/demo.sh stop
