# The two commands of the README's quick start: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INBOX ?= inbox
OUTPUT ?= output

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(INBOX) $(OUTPUT)
	$(VENV)/bin/xr-daemon --watch $(INBOX) --output $(OUTPUT) --log-format console

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_daemon.py
	$(PY) scripts/bench_pipeline.py

clean-venv:
	rm -rf $(VENV)
