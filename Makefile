# pya2a: every target installs what it needs into $(VENV) first.
#   make demo   - mpiexec demo on 4 ranks: a real exchange with every algorithm, timed
#   make test   - unit tests and examples (serial pass), then the MPI suite under
#                 mpiexec -n 1 2 3 4 5 8, and the multi-hop suite at 6 7 9 16 too, then
#                 the MPI suite on the system's Open MPI at 1 2 3 4 (test-ompi)
#   make lint   - ruff
#   make bench  - python -m pya2a bench on 4 ranks, JSON into bench/results/
#   make bench-cpu - the CPU sweep quoted in the README (bench/cpu_sweep.sh: tune, then bench
#                 at P ranks into bench/results/cpu_*_local.*; on a small machine e.g.
#                 PS="4 2" make bench-cpu)
#   make bench-oneshot - the drop-in call against mpi4py's own and plan binding costs on NP
#                 ranks (bench/oneshot_overhead.py), JSON into bench/results/
#   make bench-pfft - mpi4py-fft forward + backward on NP ranks, pya2a vs the MPI's own
#                 Alltoallw (bench/pfft_bench.py), JSON into bench/results/
# MPI=mpich (default) uses the MPICH wheel from the package registry; MPI=system builds
# mpi4py against the mpicc / mpiexec found on PATH (Open MPI, Intel MPI, Cray MPICH, ...).

VENV    ?= .venv
PYTHON  ?= python3
MPI     ?= mpich
NP      ?= 4
PY      := $(VENV)/bin/python
MPIEXEC ?= $(if $(filter system,$(MPI)),mpiexec,$(VENV)/bin/mpiexec)
STAMP   := $(VENV)/.installed-$(MPI)
FFT_STAMP := $(VENV)/.installed-mpi4py-fft
# mpi4py-fft (the tests and bench of Alltoallw run its parallel FFTs on pya2a) builds against
# the FFTW headers; as root on Debian/Ubuntu they are installed when missing
MPI4PY_FFT ?= mpi4py-fft==2.0.6
NPS     ?= 1 2 3 4 5 8
# the multi-hop algorithms' own suite also runs at the sizes in between and at 16
NPS_MULTIHOP ?= 6 7 9 16
# oversubscribed runs on small machines; a hung job is killed, never waited on forever
RUN_MPI  = timeout -k 10 900 $(MPIEXEC) -n $$n $(PY) -m mpi4py tests/run_mpi.py
# the Open MPI pass of `make test`: the MPI suite again on the system's Open MPI (installed
# when missing, as root on Debian/Ubuntu), through mpi4py's binary wheel (it runs on either
# library) in its own venv, with pya2a built against Open MPI's mpicc in a copy of the tree
OMPI_VENV ?= .venv-ompi
OMPI_TREE ?= build/ompi-tree
NPS_OMPI  ?= 1 2 3 4
OMPI_ENV  = OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
	OMPI_MCA_rmaps_base_oversubscribe=1

.PHONY: install install-fft test test-unit test-mpi test-ompi demo lint bench bench-cpu bench-oneshot bench-pfft \
	clean

install: $(STAMP)

install-fft: $(FFT_STAMP)

$(STAMP): pyproject.toml setup.py pya2a/core/_pack.pyx pya2a/core/_typepack.pyx pya2a/core/_msg.pyx pya2a/gpu/_launch.pyx
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

$(FFT_STAMP): $(STAMP)
	@if [ ! -f /usr/include/fftw3.h ] && [ ! -f /usr/local/include/fftw3.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfftw3-dev; \
	  else \
	    echo "mpi4py-fft needs the FFTW headers: install libfftw3-dev (or fftw-devel)"; exit 1; \
	  fi; \
	fi
	$(PY) -m pip install -q --no-build-isolation "$(MPI4PY_FFT)"
	touch $@

test: test-unit test-mpi test-ompi

test-unit: install install-fft
	$(PY) -m pytest -q tests

test-mpi: install install-fft
	@set -e; for n in $(NPS); do \
	  echo "== mpiexec -n $$n"; \
	  $(RUN_MPI) -q -m "not serial" -p no:cacheprovider tests; \
	done
	@set -e; for n in $(NPS_MULTIHOP); do \
	  echo "== mpiexec -n $$n (multi-hop algorithms)"; \
	  $(RUN_MPI) -q -m "not serial" -p no:cacheprovider tests/test_multihop.py; \
	done

test-ompi:
	@if ! command -v ompi_info >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev; \
	  else \
	    echo "the Open MPI pass needs Open MPI: install openmpi-bin and libopenmpi-dev"; exit 1; \
	  fi; \
	fi
	test -x $(OMPI_VENV)/bin/python || $(PYTHON) -m venv $(OMPI_VENV)
	$(OMPI_VENV)/bin/python -m pip install -q --upgrade "mpi4py>=4" "numpy>=1.23" "cython>=3" \
	  "setuptools>=77" wheel pytest
	rm -rf $(OMPI_TREE) && mkdir -p $(OMPI_TREE)
	git ls-files -z | xargs -0 cp --parents -t $(OMPI_TREE)
	cd $(OMPI_TREE) && MPICC="$$(command -v mpicc.openmpi || echo mpicc)" \
	  $(abspath $(OMPI_VENV))/bin/python setup.py -q build_ext --inplace
	@cd $(OMPI_TREE) && $(abspath $(OMPI_VENV))/bin/python -c "from pya2a.algorithms._bound \
	  import exec_module; from mpi4py import MPI; assert exec_module() is not None, \
	  'pya2a.core._exec was not built for ' + MPI.Get_library_version()[:40]"
	@set -e; cd $(OMPI_TREE); run=$$(command -v mpiexec.openmpi || echo mpiexec); \
	for n in $(NPS_OMPI); do \
	  echo "== Open MPI: mpiexec -n $$n"; \
	  $(OMPI_ENV) PYTHONPATH=$(abspath $(OMPI_TREE)) timeout -k 10 900 $$run -n $$n \
	    $(abspath $(OMPI_VENV))/bin/python \
	    -m mpi4py tests/run_mpi.py -q -m "not serial" -p no:cacheprovider tests; \
	done

demo: install
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py examples/demo.py

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(MPIEXEC) -n $(NP) $(PY) -m pya2a bench --json bench/results/bench-local-$(NP).json

bench-cpu: install
	PATH="$(abspath $(VENV))/bin:$$PATH" MPIEXEC=$(MPIEXEC) PY=$(PY) \
	  bash bench/cpu_sweep.sh bench/results

bench-oneshot: install
	$(MPIEXEC) -n $(NP) $(PY) bench/oneshot_overhead.py --iters 300 --passes 25 --profile \
	  --json bench/results/oneshot_p$(NP)_local.json

bench-pfft: install install-fft
	$(MPIEXEC) -n $(NP) $(PY) bench/pfft_bench.py --json bench/results/pfft_p$(NP)_local.json

clean:
	rm -rf build *.egg-info pya2a/core/_pack.c pya2a/core/_pack*.so pya2a/core/_typepack.c \
	  pya2a/core/_typepack*.so pya2a/core/_msg.c \
	  pya2a/core/_msg*.so
