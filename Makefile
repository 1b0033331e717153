# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean-demo

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.runtime

# Standard-library sources -> tokenizer -> TFRecords -> a few minutes of training -> a sample.
demo: $(VENV)/.runtime
	$(PY) data/prepare_demo.py
	$(PY) main.py --model demo
	$(PY) main.py --model demo --predict --prompt data/demo_prompt.txt

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --durations=15

bench: $(VENV)/.test
	$(PY) bench/train_throughput.py
	$(PY) bench/generate_throughput.py
	$(PY) bench/data_throughput.py
	$(PY) bench/attention_scaling.py

clean-demo:
	rm -rf demo_data runs/demo
