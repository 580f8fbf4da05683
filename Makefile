# pya2a: every target installs what it needs into $(VENV) first.
#   make demo   - mpiexec demo on 4 ranks: a real exchange with every algorithm, timed
#   make test   - unit tests and examples (serial pass), then the MPI suite under
#                 mpiexec -n 1 2 3 4 5 8, and the multi-hop suite at 6 7 9 16 too
#   make lint   - ruff
#   make bench  - python -m pya2a bench on 4 ranks, JSON into bench/results/
#   make bench-cpu - the CPU sweep quoted in the README (bench/cpu_sweep.sh: tune, then bench
#                 at P ranks into bench/results/cpu_*_local.*; on a small machine e.g.
#                 PS="4 2" make bench-cpu)
# MPI=mpich (default) uses the MPICH wheel from the package registry; MPI=system builds
# mpi4py against the mpicc / mpiexec found on PATH (Open MPI, Intel MPI, Cray MPICH, ...).

VENV    ?= .venv
PYTHON  ?= python3
MPI     ?= mpich
NP      ?= 4
PY      := $(VENV)/bin/python
MPIEXEC ?= $(if $(filter system,$(MPI)),mpiexec,$(VENV)/bin/mpiexec)
STAMP   := $(VENV)/.installed-$(MPI)
NPS     ?= 1 2 3 4 5 8
# the multi-hop algorithms' own suite also runs at the sizes in between and at 16
NPS_MULTIHOP ?= 6 7 9 16
# oversubscribed runs on small machines; a hung job is killed, never waited on forever
RUN_MPI  = timeout -k 10 900 $(MPIEXEC) -n $$n $(PY) -m mpi4py tests/run_mpi.py

.PHONY: install test test-unit test-mpi demo lint bench bench-cpu clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py pya2a/core/_pack.pyx pya2a/gpu/_launch.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(MPI),system)
	$(PY) -m pip install -q --no-binary=mpi4py "mpi4py>=4"
else
	$(PY) -m pip install -q mpich "mpi4py>=4"
endif
	$(PY) -m pip install -q "numpy>=1.23" "cython>=3" setuptools wheel pytest ruff
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

test: test-unit test-mpi

test-unit: install
	$(PY) -m pytest -q tests

test-mpi: install
	@set -e; for n in $(NPS); do \
	  echo "== mpiexec -n $$n"; \
	  $(RUN_MPI) -q -m "not serial" -p no:cacheprovider tests; \
	done
	@set -e; for n in $(NPS_MULTIHOP); do \
	  echo "== mpiexec -n $$n (multi-hop algorithms)"; \
	  $(RUN_MPI) -q -m "not serial" -p no:cacheprovider tests/test_multihop.py; \
	done

demo: install
	$(MPIEXEC) -n $(NP) $(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(MPIEXEC) -n $(NP) $(PY) -m pya2a bench --json bench/results/bench-local-$(NP).json

bench-cpu: install
	PATH="$(abspath $(VENV))/bin:$$PATH" MPIEXEC=$(MPIEXEC) PY=$(PY) \
	  bash bench/cpu_sweep.sh bench/results

clean:
	rm -rf build *.egg-info pya2a/core/_pack.c pya2a/core/_pack*.so
