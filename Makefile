# Two commands a newcomer needs: `make demo` and `make test`. Everything else is a helper.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
DOCKER ?= docker
# Where `make images` tags the images, and with which version (the workspace's).
REGISTRY ?= ghcr.io/sd35-operator
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# GPU generation the server's CUDA kernels are compiled for (see inference/server/Dockerfile).
CUDA_COMPUTE_CAP ?= 80
# Where the control plane binaries live (built once per version into a per-user cache).
CONTROLPLANE_BIN = $(shell bash tests/controlplane/build.sh)

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: controlplane
controlplane: ## Build etcd, kube-apiserver, controller-manager, scheduler, kubectl, kwok, helm (cached)
	@bash tests/controlplane/build.sh

.PHONY: lint
lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: unit
unit: ## Tests that need no cluster: unit, snapshot, parity, drift and server tests
	SD35_PYTHON="$$(bash tools/python-env.sh)" $(CARGO) test --locked

.PHONY: fuzz
fuzz: ## Fuzz request parsing and validation for FUZZ_SECONDS (60) from the committed corpus (nightly, cargo-fuzz)
	bash tools/fuzz.sh

.PHONY: loadcheck
loadcheck: ## Overload, slow clients and SIGTERM against the server on the tiny model; prints the figures
	$(CARGO) build --locked -q -p sd35-server --bin sd35-server -p sd35-http --bin sd35-loadcheck
	./target/debug/sd35-loadcheck --server target/debug/sd35-server --model inference/testdata/sd35-tiny-large

.PHONY: e2e
e2e: ## End-to-end tests on a real local control plane with kwok GPU nodes
	bin="$$(bash tests/controlplane/build.sh)"; \
	$(CARGO) build --locked -q -p sd35-operator --bin sd35-operator -p sd35-server --bin sd35-server; \
	SD35_CONTROLPLANE_BIN="$$bin" SD35_OPERATOR_BIN="$$PWD/target/debug/sd35-operator" \
	  SD35_SERVER_BIN="$$PWD/target/debug/sd35-server" $(CARGO) test --locked -p sd35-e2e

.PHONY: test
test: controlplane lint unit fuzz e2e cuda ## Everything CI runs (cuda: the CUDA build, checked without a GPU)

.PHONY: crds
crds: ## Regenerate the CRD YAML (crds/, the chart) and docs/api.md from the Rust types
	$(CARGO) run -q -p sd35-crds --bin crdgen -- --write

.PHONY: images
images: ## Build the operator and server container images (Docker with BuildKit)
	$(DOCKER) build -f operator/Dockerfile -t $(REGISTRY)/sd35-operator:$(VERSION) .
	$(DOCKER) build -f inference/server/Dockerfile --build-arg CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
	  -t $(REGISTRY)/sd35-server:$(VERSION) .

.PHONY: chart
chart: ## Lint and render the Helm chart with every ci/ scenario
	helm="$$(bash tests/controlplane/build.sh)/helm"; \
	for values in charts/sd35-operator/ci/*-values.yaml; do \
	  "$$helm" lint --strict --kube-version 1.34.0 charts/sd35-operator -f "$$values"; \
	  "$$helm" template sd35 charts/sd35-operator --kube-version 1.34.0 -f "$$values" >/dev/null; \
	done

.PHONY: demo
demo: ## Local cluster with GPU nodes, the CRD and the operator; apply an example and watch it get Ready
	bin="$$(bash tests/controlplane/build.sh)"; export SD35_CONTROLPLANE_BIN="$$bin"; \
	$(CARGO) build -q -p sd35-e2e --bin sd35-localcluster -p sd35-operator --bin sd35-operator; \
	./target/debug/sd35-localcluster start; \
	export KUBECONFIG="$$(./target/debug/sd35-localcluster kubeconfig)"; \
	state="$$(dirname "$$KUBECONFIG")"; \
	"$$bin/kubectl" apply -f crds/; \
	for i in $$(seq 60); do "$$bin/kubectl" get sd35 >/dev/null 2>&1 && break; sleep 1; done; \
	nohup ./target/debug/sd35-operator --admin-addr=127.0.0.1:18081 >"$$state/operator.log" 2>&1 & \
	echo $$! >"$$state/operator.pid"; \
	"$$bin/kubectl" create secret generic hf-token --from-literal=token=hf_demo --dry-run=client -o yaml | "$$bin/kubectl" apply -f -; \
	"$$bin/kubectl" apply -f examples/large-bf16.yaml; \
	"$$bin/kubectl" get nodes -L nvidia.com/gpu.product; \
	for i in $$(seq 90); do \
	  [ "$$("$$bin/kubectl" get sd35 sd35-large -o jsonpath='{.status.phase}')" = Ready ] && break; sleep 1; \
	done; \
	"$$bin/kubectl" get sd35,jobs,deployments,pods,pvc -o wide; \
	echo; echo "The cluster and the operator keep running (kwok nodes run no processes: pods go"; \
	echo "Running and Job pods succeed without running the server). Try:"; \
	echo "  export KUBECONFIG=$$KUBECONFIG PATH=$$bin:\$$PATH"; \
	echo "  kubectl describe sd35 sd35-large; kubectl explain sd35.spec"; \
	echo "Stop it with: make demo-stop"

.PHONY: bench-operator
bench-operator: ## Operator benchmark: N SD35Deployments to Ready, requests per object, RSS, CPU
	bin="$$(bash tests/controlplane/build.sh)"; \
	$(CARGO) build --locked -q --release -p sd35-operator --bin sd35-operator; \
	$(CARGO) build --locked -q -p sd35-e2e --bin sd35-bench-operator --bin sd35-localcluster; \
	SD35_CONTROLPLANE_BIN="$$bin" SD35_OPERATOR_BIN="$$PWD/target/release/sd35-operator" \
	  ./target/debug/sd35-bench-operator --objects $${OBJECTS:-100,500} $${BENCH_ARGS:-}

.PHONY: cuda
cuda: ## Build sd35-server with CUDA here, no GPU needed (pinned CUDA 13.0 wheels, cached per user)
	@bash tools/cuda/build.sh

.PHONY: bench-cpu
bench-cpu: ## CPU benchmark: our pipeline and diffusers side by side (reference venv, THREADS=2)
	$(CARGO) build --locked -q --release -p sd35-server
	"$${SD35_REFERENCE_PYTHON:-$$HOME/.cache/sd35-reference/bin/python}" inference/reference/benchmark.py \
	  --threads $${THREADS:-2}

.PHONY: bench-kernels
bench-kernels: ## CPU kernels side by side: sgemm, fused vs unfused attention (THREADS=2)
	RAYON_NUM_THREADS=$${THREADS:-2} $(CARGO) bench --locked -q -p sd35-pipeline --bench cpu_kernels

.PHONY: device-bench
device-bench: ## Prepare target/cuda/ for the GPU benchmark; on the GPU machine run tools/device-bench.sh
	bash tools/device-bench.sh --prepare

.PHONY: demo-stop
demo-stop: ## Stop the demo operator and cluster
	state="$$(dirname "$$(./target/debug/sd35-localcluster kubeconfig)")"; \
	if [ -f "$$state/operator.pid" ]; then kill "$$(cat "$$state/operator.pid")" 2>/dev/null || true; fi; \
	./target/debug/sd35-localcluster stop
