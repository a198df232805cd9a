# edgeinfer: first `make run` (sets up .venv, fetches the default model, opens a chat), then `make test`.
# Needs only python3 (3.10+) and make; on Debian/Ubuntu as root it also uses apt-get, best effort.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
ARGS        ?=
PYTEST_ARGS ?=

OPENBLAS_X86   := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
OPENBLAS_ARM64 := /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0

.DEFAULT_GOAL := help
.PHONY: help setup setup-test run test clean openblas test-tools bench-peers

help:
	@echo "make run      set up .venv (runtime deps) and chat with the default model; ARGS='...' for more"
	@echo "make test     set up .venv with the test extras and run pytest; PYTEST_ARGS='...' for more"
	@echo "make setup    runtime deps only        make setup-test   runtime + test deps"
	@echo "make clean    remove build artefacts and __pycache__ (keeps .venv, models/ and the model cache)"
	@echo "make bench-peers   install the peers (llama.cpp, onnxruntime-genai, mlx-lm) and run benchmarks/peers.py; ARGS='...'"

setup: $(VENV)/.stamp-runtime

setup-test: $(VENV)/.stamp-test

run: setup
	$(VENV)/bin/edgeinfer chat $(ARGS)

test: setup-test
	$(VPY) -m pytest $(PYTEST_ARGS)

# The interpreter of the venv; created when missing. If the venv module is absent (Debian/Ubuntu
# without python3-venv) and we are root with apt-get, install it and try again.
$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: edgeinfer needs Python 3.10 or newer as '$(PYTHON)' (set PYTHON=python3.x)" >&2; exit 1; }
	@echo "creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')"
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    echo "the venv module is missing; installing python3-venv with apt-get"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -q python3-venv python$$v-venv >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q python3-venv python$$v-venv >/dev/null 2>&1; }; } \
	      || apt-get install -y -q python3-venv >/dev/null 2>&1 || true; \
	    $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	      echo "error: '$(PYTHON) -m venv' still fails; install the venv module for this Python" >&2; exit 1; }; \
	  else \
	    echo "error: '$(PYTHON) -m venv $(VENV)' failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; \
	    exit 1; \
	  fi; }

$(VENV)/.stamp-runtime: pyproject.toml setup.py edgeinfer/native/decode.c | $(VPY)
	@$(MAKE) --no-print-directory openblas
	@echo "installing edgeinfer and its runtime dependencies into $(VENV)"
	@$(VPY) -m pip install -q --upgrade pip
	@$(VPY) -m pip install -q -e .
	@touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-runtime
	@$(MAKE) --no-print-directory test-tools
	@echo "installing the test dependencies into $(VENV)"
	@$(VPY) -m pip install -q -e '.[test]'
	@touch $@

# Best effort, never fatal: MLX's CPU backend runs its matmuls far faster with OpenBLAS present.
openblas:
	@if [ "$$(uname -s)" = Linux ]; then \
	  case "$$(uname -m)" in \
	    x86_64|amd64) lib=$(OPENBLAS_X86) ;; \
	    aarch64|arm64) lib=$(OPENBLAS_ARM64) ;; \
	    *) lib= ;; \
	  esac; \
	  if [ -n "$$lib" ] && [ ! -e "$$lib" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing libopenblas0-pthread with apt-get"; \
	      export DEBIAN_FRONTEND=noninteractive; \
	      { apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
	        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; }; } \
	        || echo "note: could not install libopenblas0-pthread; MLX's CPU backend will be slower"; \
	    else \
	      echo "note: $$lib is missing (apt-get install libopenblas0-pthread); MLX's CPU backend will be slower"; \
	    fi; \
	  fi; \
	fi; true

# Best effort: programs some tests drive; those tests are skipped without them.
# $(call apt_tool,COMMAND,DEBIAN PACKAGE,WHAT NEEDS IT)
define apt_tool
	@if ! command -v $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2) with apt-get ($(3))"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -q $(2) >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(2) >/dev/null 2>&1; }; } \
	      || echo "note: could not install $(2); the tests that need it ($(3)) will be skipped"; \
	  else \
	    echo "note: $(1) is missing (apt-get install $(2)); the tests that need it ($(3)) will be skipped"; \
	  fi; \
	fi; true
endef

test-tools:
	$(call apt_tool,tmux,tmux,the chat tests run the app in a real terminal)
	$(call apt_tool,chromium,chromium,the scenario report test opens report.html in a headless browser)
	$(call apt_tool,espeak-ng,espeak-ng,the espeak-ng speech-input test; scenarios then speak from committed clips)

# The side-by-side benchmark (issue 3): peers are an optional extra, never runtime dependencies.
# llama.cpp is built without -march=native (a native build segfaulted in eval on an AMX Xeon), with the
# x86 SIMD levels this CPU reports switched on explicitly; other architectures take ggml's defaults.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF $(if $(filter avx2,$(CPU_FLAGS)),-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) \
  $(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) $(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
  $(if $(filter avx_vnni,$(CPU_FLAGS)),-DGGML_AVX_VNNI=ON)
# Writes its section of docs/BENCHMARKS.md; ARGS='-r 5 --threads 2' etc. are passed to the script.
$(VENV)/.stamp-peers: pyproject.toml $(VENV)/.stamp-runtime
	@echo "installing the benchmark peers into $(VENV) (llama-cpp-python compiles llama.cpp: minutes; $(LLAMA_CMAKE_ARGS))"
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VPY) -m pip install -q -e '.[peers]'
	@touch $@

bench-peers: $(VENV)/.stamp-peers
	$(VPY) benchmarks/peers.py $(ARGS)

clean:
	rm -rf build dist .pytest_cache edgeinfer.egg-info
	find . \( -path ./.venv -o -path ./.git -o -path ./models \) -prune -o \
	  \( -name __pycache__ -type d -o -name '*.py[co]' -type f \) -print0 | xargs -0 rm -rf
