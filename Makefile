# giftd: `make run` and `make test` are all a fresh Debian/Ubuntu machine needs.
#
# One cargo profile (release) for binaries, tests, clippy and benchmarks, so RocksDB's C++ is built
# once (~15 min on 2 cores). The target dir lives outside the clone so that fresh clones on a warm
# machine rebuild only the project.

CARGO_TARGET_DIR ?= $(HOME)/.cache/giftd/target
export CARGO_TARGET_DIR
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DATA_DIR ?= ./data

.PHONY: all deps test-deps build run test fmt lint bench clean

all: build

# rocksdb's bindings need clang and libclang; a fresh machine may lack them (and cargo).
deps:
	@if ! command -v clang >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then \
		echo "installing clang and libclang (needed by rocksdb's bindings)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev make; \
	fi
	@if ! command -v cargo >/dev/null 2>&1; then \
		echo "installing the Rust toolchain (rustup)"; \
		curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy; \
	fi

# The observability tests run Debian's promtool and a real Prometheus server on loopback. The
# package's own service is not wanted on a development machine: it is disabled if systemd started it.
test-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
		echo "installing prometheus and promtool (used by the observability tests)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
		if command -v systemctl >/dev/null 2>&1; then $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1 || true; fi; \
	fi

build: deps
	cargo build --release --workspace --bins

run: build
	@echo "giftd: protocol on 127.0.0.1:7420, metrics on http://127.0.0.1:9420/metrics, data in $(DATA_DIR)"
	@echo "try:   $(CARGO_TARGET_DIR)/release/giftctl balance --number 6035719900001234"
	$(CARGO_TARGET_DIR)/release/giftd --data-dir $(DATA_DIR)

fmt:
	cargo fmt --all -- --check

lint: deps
	cargo clippy --release --workspace --all-targets -- -D warnings

test: deps test-deps fmt lint
	cargo test --release --workspace

bench: deps
	cargo bench --workspace --bench codec --bench engine

clean:
	cargo clean
