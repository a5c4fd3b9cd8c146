# Two commands do all the set-up on a fresh machine:
#   make demo   venv + install, write the bundled example, quantize it, verify it, print the reports
#   make test   venv + install, run the test suite (what .ci/run calls)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: venv demo test clean

$(BIN)/fp8conv: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/fp8conv

venv: $(BIN)/fp8conv

demo: venv
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/fp8conv example $(DEMO)/onerec-fp16
	$(BIN)/fp8conv quantize $(DEMO)/onerec-fp16 $(DEMO)/onerec-fp8
	$(BIN)/fp8conv verify $(DEMO)/onerec-fp16 $(DEMO)/onerec-fp8

test: venv
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
