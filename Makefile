# crac-operator. `make help` lists the targets. On a fresh machine, `make demo` shows the
# product and `make test` runs the tests; both install what they need.

SHELL := /bin/bash
CARGO ?= cargo
CLUSTER := tests/cluster
KUBECONFIG_FILE := target/cluster/kubeconfig

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install missing Debian packages (openssl, curl, util-linux, file, a JDK)
	@scripts/deps

.PHONY: build
build: ## Build every binary (debug) and the static agent (release)
	$(CARGO) build --workspace --bins
	crates/agent/build-static >/dev/null

.PHONY: crds
crds: ## Regenerate crds/, the chart's copy, deploy/ and docs/reference.md from crates/api
	$(CARGO) run -q -p crac-operator --bin crdgen > crds/crds.yaml
	$(CARGO) run -q -p crac-operator --bin crdgen -- --reference > docs/reference.md
	@if [ -d charts/crac-operator/crds ]; then cp crds/crds.yaml charts/crac-operator/crds/crds.yaml; fi
	scripts/render-manifests

.PHONY: helm-lint
helm-lint: ## Lint the Helm chart (Helm is built once from its Go module, tests/helm)
	scripts/helm lint --strict charts/crac-operator

.PHONY: manifests
manifests: ## Regenerate deploy/crac-operator.yaml from the chart
	scripts/render-manifests

.PHONY: images
images: ## Build the operator, activator and agent images (prints the commands without a container engine)
	scripts/images

.PHONY: cluster-up
cluster-up: deps ## Start the test cluster: control plane, kwok nodes and a real node (kubelet, containerd)
	$(CLUSTER)/up

.PHONY: cluster-down
cluster-down: ## Stop the test cluster and remove the real node's processes, mounts, cgroups and bridge
	$(CLUSTER)/down

.PHONY: criu
criu: deps ## Fetch CRIU 4.2.1 and its libraries from Debian unstable into the cache
	scripts/fetch-criu >/dev/null

.PHONY: unit
unit: ## Every test that needs no cluster, JVM, CRIU or Helm (unit tests, the data path, layering, generated files); seconds
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test -p crac-activator --test data_path --test binary
	$(CARGO) test -p crac-agent --test commands
	$(CARGO) test -p crac-tests --test layout --test generated

.PHONY: test
test: deps cluster-up criu ## Unit, control-plane, agent (real JVM + CRIU), data-path, install and CLI tests
	scripts/helm version >/dev/null
	scripts/kube-score version >/dev/null
	$(CARGO) test --workspace --no-fail-fast

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: demo
demo: deps cluster-up criu ## Show the product in real containers on the test cluster's real node
	scripts/demo

.PHONY: chaos
chaos: deps ## The wake path under failure: callers across sleeps, activator restart and kill, hostile callers, operator kills (CHAOS_ONLY picks; about 8 min)
	scripts/chaos

.PHONY: bench
bench: deps criu ## Every benchmark, side by side (BENCH_ONLY="a b c d e f" picks); results go to docs/benchmarks.md by hand
	scripts/bench
