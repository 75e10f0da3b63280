# keyhaven — the two commands the README promises, and a few helpers.
.PHONY: test demo unit e2e crds manifests bed-up bed-down lint bench soak

# Everything: unit tests, the CRD drift test and the end-to-end tests on a real control
# plane, OpenBao and SoftHSM2 (brought up by e2e/testbed, built once and cached).
test:
	e2e/testbed up
	cargo test --locked --workspace --all-targets

# The demo: the test bed, the CRDs, the operator, the examples, and the Secrets they make.
demo:
	e2e/demo

unit:
	cargo test --locked --lib --test crds --test chart

crds:
	cargo run --quiet -- crds --out-dir crds
	cp crds/*.yaml helm/keyhaven/crds/

# manifests/keyhaven.yaml: the chart rendered with its defaults (helm comes from the test bed).
manifests: bed-up
	KEYHAVEN_UPDATE_MANIFESTS=1 cargo test --locked --test e2e_deploy chart_lints_and_manifests

bed-up:
	e2e/testbed up

bed-down:
	e2e/testbed down

lint:
	cargo fmt --all --check
	cargo clippy --locked --workspace --all-targets -- -D warnings

# The benchmark (docs/benchmarks.md): keyhaven vs the limit vs ESO (once `e2e/testbed build-eso`
# has cached it; else ESO is "not run") on the test bed. N=1000 by
# default; `make bench BENCH_N=10000` for the issue's second size. The bench is the workspace
# member bench/ (package keyhaven-bench); it starts the keyhaven binary built next to it.
BENCH_N ?= 1000
BENCH_ARGS ?=
bench: bed-up
	cargo build --release --locked -p keyhaven --bin keyhaven -p keyhaven-bench --bin keyhaven-bench
	. e2e/.testbed/env && $${CARGO_TARGET_DIR:-target}/release/keyhaven-bench --n $(BENCH_N) $(BENCH_ARGS)

# The soak (issue 20; not part of CI): SOAK_N pushed ManagedSecrets for SOAK_MINUTES with
# faults drawn at random (OpenBao, kube-apiserver, etcd, the HSM token, a store switch);
# prints syncs, errors, lost (must be 0), RSS at start and end, and change latencies.
# Settings: SOAK_N (1000), SOAK_MINUTES (30), SOAK_REFRESH (10s), SOAK_WRITE_MS (100),
# SOAK_FAULTS (8), SOAK_FAULT_KINDS (all; e.g. "softhsm token gone"), SOAK_SEED. It stops
# and restarts the bed's servers: run nothing else on it.
# SOAK_CARGO_ARGS=--release soaks an optimized build (the default reuses `make test`'s).
SOAK_CARGO_ARGS ?=
soak: bed-up
	cargo test $(SOAK_CARGO_ARGS) --locked --test soak -- --ignored --nocapture
