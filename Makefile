# Every target runs inside .venv/ at the repository root; `make install` builds it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test unit integration demo demo-quick bench soak age clean test-etcd34 test-docker test-torch

install: $(STAMP)

# torch goes first with its exact pin: a looser spec with no torch present would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two test processes, a file to each at a time: most tests wait on timeouts, not on the CPU.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile unit_tests integration_tests

unit: install
	$(PY) -m pytest -q unit_tests

integration: install
	$(PY) -m pytest -q integration_tests

# etcd 3.4 (Debian's etcd-server, unpacked under .venv/) against the tests that talk to etcd
# itself; torchrun and CLI tests add minutes and nothing version-specific.
ETCD34_DIR := $(VENV)/etcd-3.4
ETCD34_TESTS := integration_tests/test_etcd_*.py integration_tests/test_faults_*.py

test-etcd34: install
	.ci/get-etcd34 $(ETCD34_DIR)
	ETCD_BINARY=$(abspath $(ETCD34_DIR))/etcd $(PY) -m pytest -q -m "not slow" $(ETCD34_TESTS)

# The integration suite with its session etcd in a container (a local image built FROM scratch
# when no registry is reachable) and the container-cluster tests; needs a running Docker engine.
DOCKER_STAMP := $(VENV)/.installed-docker

$(DOCKER_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,docker]'
	touch $(DOCKER_STAMP)

test-docker: $(DOCKER_STAMP)
	@$(PY) -c "import docker; docker.from_env(timeout=10).ping()" >/dev/null 2>&1 || { \
	  echo "make test-docker: no Docker engine answers at $${DOCKER_HOST:-unix:///var/run/docker.sock}." >&2; \
	  echo "Start one (as root): 'systemctl start docker', or 'dockerd >/tmp/dockerd.log 2>&1 &'; see README, 'Tests on etcd 3.4 and in Docker'." >&2; \
	  exit 1; }
	TESTCONTAINERS_RYUK_DISABLED=true ETCD_SOURCE=docker $(PY) -m pytest -q integration_tests

# The torchrun tests on another torch: `make test-torch TORCH=2.6.0` builds .torch-matrix/2.6.0/
# with that torch from the package index (a CUDA build: several GB with its libraries) and runs
# every test that goes through torchrun and its handler registry. Wheels are kept in
# .torch-matrix/wheels: PyPI's files come without caching headers, so pip's own cache keeps none.
# Not part of `make test` or CI; README, "Supported torch versions".
MATRIX_DIR := .torch-matrix
MATRIX_WHEELS := $(MATRIX_DIR)/wheels
MATRIX_TESTS := integration_tests/test_torchrun_etcd.py integration_tests/test_torchrun_c10d.py \
	"integration_tests/test_fork.py::test_torchrun_fork_start_method_two_workers_per_agent" \
	unit_tests/test_torch_private.py unit_tests/test_etcd_config.py unit_tests/test_c10d_plugin.py \
	unit_tests/test_c10d_backend.py unit_tests/test_core_handler.py

# torch first, with its exact pin, from the wheel cache (what is there already is not fetched
# again); then the package, under a constraint that holds torch at that version.
$(MATRIX_DIR)/%/.installed: pyproject.toml
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	echo "torch==$*" > $(@D)/constraints.txt
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip download -q -c $(@D)/constraints.txt -d $(MATRIX_WHEELS) --find-links $(MATRIX_WHEELS) torch==$*
	$(@D)/bin/python -m pip install -q -c $(@D)/constraints.txt --no-index --find-links $(MATRIX_WHEELS) torch==$*
	$(@D)/bin/python -m pip install -q -c $(@D)/constraints.txt -e '.[test]' || { \
	  echo "make test-torch: the package cannot be installed beside torch==$* (see pip's reason above); pyproject.toml names the torch versions it supports." >&2; \
	  exit 1; }
	touch $@

test-torch:
	@test -n "$(TORCH)" || { echo "make test-torch: name a torch version, e.g. 'make test-torch TORCH=2.6.0'." >&2; exit 2; }
	$(MAKE) $(MATRIX_DIR)/$(TORCH)/.installed
	$(MATRIX_DIR)/$(TORCH)/bin/python -m pytest -q -p no:cacheprovider $(MATRIX_TESTS)

demo: install
	$(PY) -m etcd_rdzv.demo

demo-quick: install
	$(PY) -m etcd_rdzv.demo --quick

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.run --quick

soak: install
	$(PY) -m benchmarks.soak

age: install
	$(PY) -m benchmarks.age --backend both --rounds 1000 --n 4

clean:
	rm -rf $(VENV) build *.egg-info
