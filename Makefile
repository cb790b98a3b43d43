# The two commands of the README's quick start: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: `make run` installs what running needs; the test extra (Ray, Playwright, psycopg, ...)
# comes only with `make test`, whose install also satisfies `run`.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
INBOX ?= inbox
OUTPUT ?= output

.PHONY: run test bench browser pacs clean-venv

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

# config.yaml is the operator's example (watch inbox, output output); the flags let INBOX=/OUTPUT= override.
run: $(RUN_STAMP)
	mkdir -p $(INBOX) $(OUTPUT)
	$(VENV)/bin/xr-daemon --config config.yaml --watch $(INBOX) --output $(OUTPUT) --log-format console

# Debian's chromium for the review page's browser test (apt-get update first when the install fails). Where
# it cannot be had the test skips, saying why; with XR_REQUIRE_BROWSER=1 (CI) this target fails instead.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 && { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  if [ "$${XR_REQUIRE_BROWSER:-}" = 1 ]; then \
	    echo "chromium could not be installed (apt-get install chromium) and XR_REQUIRE_BROWSER=1" >&2; exit 1; \
	  else echo "chromium could not be installed: tests/test_review_browser.py will skip"; fi

# Orthanc (a PACS) and dcmtk (storescu/echoscu, a modality) for the DICOM node's round-trip tests; they
# skip, saying why, where these cannot be had; with XR_REQUIRE_DICOM=1 (CI) this target fails instead.
pacs:
	@{ command -v Orthanc >/dev/null 2>&1 && command -v storescu >/dev/null 2>&1; } || { \
	  command -v apt-get >/dev/null 2>&1 && { apt-get install -y -qq orthanc dcmtk >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq orthanc dcmtk >/dev/null 2>&1; }; }; } || \
	  if [ "$${XR_REQUIRE_DICOM:-}" = 1 ]; then \
	    echo "orthanc and dcmtk could not be installed (apt-get install orthanc dcmtk) and XR_REQUIRE_DICOM=1" >&2; exit 1; \
	  else echo "orthanc/dcmtk could not be installed: the DICOM round-trip tests will skip"; fi

# ruff first: a lint finding or unformatted file fails the run in seconds, before the 15-minute suite
test: $(STAMP) browser pacs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_daemon.py
	$(PY) scripts/bench_pipeline.py
	$(PY) scripts/bench_dicom.py

clean-venv:
	rm -rf $(VENV)
