# The two sacred commands: `make reproduce` and `make test`. Both build .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= data/toystreets
RUNS    ?= runs
STAMP   := $(VENV)/.installed

.PHONY: venv test lint format reproduce data figures lab clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	CONFETI_SMOKE=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q --nbmake --nbmake-timeout=3600 tests notebooks

data: $(STAMP)
	$(BIN)/python -m confeti data toy --out $(DATA)

reproduce: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m confeti reproduce --data $(DATA) --runs $(RUNS) --figures figures

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf $(RUNS) notebooks/.executed .pytest_cache
