# The two commands of the README: `make run` and `make test` (as root).
# Each first installs whatever is missing (deploy/setup.sh).
ARGS ?=
PYTEST_ARGS ?=
KERNELS_ARGS ?=
VENV := .venv

.PHONY: setup setup-unit setup-test setup-kernels run test test-kernels unit bench bench-quick dashboards clean

setup:
	@MAKE_TARGET=run deploy/setup.sh run

setup-unit:
	@MAKE_TARGET=unit deploy/setup.sh test

# `make test` runs the kernel matrix too: its set-up adds QEMU and the kernels
setup-test:
	@MAKE_TARGET=test deploy/setup.sh kernels

run: setup
	$(VENV)/bin/tcpstate serve $(ARGS)

# Every test on the host's kernel, then the same program on Debian's 6.1 and
# 6.12 in VMs (the host's kernel was just tested in full: --no-host).
test: setup-test
	$(VENV)/bin/tcpstate serve --dry-run
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests
	$(VENV)/bin/python -m tests.vm.matrix --no-host $(KERNELS_ARGS)

# tcpstate on Debian 12's 6.1 and Debian's 6.12 kernels in VMs, and on the
# host's kernel (tests/vm/); the first run downloads the kernels.
setup-kernels:
	@MAKE_TARGET=test-kernels deploy/setup.sh kernels

test-kernels: setup-kernels
	$(VENV)/bin/python -m tests.vm.matrix $(KERNELS_ARGS)

unit: setup-unit
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/unit

# Benchmarks (bench/, BENCHMARKS.md): about 10 minutes; bench-quick about 1.
BENCH_ARGS ?=
bench: setup-unit
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

bench-quick: setup-unit
	$(VENV)/bin/python -m bench.run --quick $(BENCH_ARGS)

# Regenerate dashboards/*.json and dashboards/rules/tcpstate.rules.yml from dashboards/*.py
dashboards: setup-unit
	$(VENV)/bin/python -m dashboards.generate

clean:
	rm -rf $(VENV) build dist *.egg-info
