# The two entry points: `make pipeline` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROFILE ?= smoke
# pseudo-label rounds after the run, and more options of covidkit pipeline (docs/pseudo-labels.md), e.g.
# make pipeline ROUNDS=1 PIPELINE_ARGS="--set 08.external=[synthetic]"
ROUNDS ?= 0
PIPELINE_ARGS ?=
INPUT  ?= input
SIIM   := $(INPUT)/siim-covid19-detection

WHEELS := $(VENV)/kaggle-wheels
.PHONY: install pipeline data test clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# Synthetic data only when no competition data is in input/.
data: install
	@if [ -f $(SIIM)/train_study_level.csv ]; then \
		echo "using the data in $(INPUT)/"; \
	else \
		$(VENV)/bin/covidkit synth --out $(INPUT) --seed 0; \
	fi

pipeline: data
	$(VENV)/bin/covidkit pipeline --profile $(PROFILE) --input $(INPUT) --rounds $(ROUNDS) $(PIPELINE_ARGS)

# The prediction wheels a Kaggle bundle holds (tests/test_kaggle.py builds one offline from them).
$(WHEELS)/.done: $(STAMP)
	$(VENV)/bin/covidkit kaggle wheels --out $(WHEELS)
	touch $@

test: install $(WHEELS)/.done
	COVIDKIT_WHEEL_CACHE=$(WHEELS) $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
