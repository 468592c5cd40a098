# The two README commands: `make demo` (main job) and `make test` (tests + lint). Both create the
# virtual environment at .venv and install the project into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo bank test test-slow test-all test-fast lint venv clean docker-smoke docker-ci

venv: $(STAMP)

# Reinstall when the metadata changes or a top-level package appears (editable installs map packages
# when they are installed).
$(STAMP): pyproject.toml $(wildcard */__init__.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rcm-nddr demo

# The SYNTH_MT filter bank by its full recipe (configs/synthetic/pretrain.yaml): a 2000-image pretraining
# set of other scenes than data/SYNTH_MT, then the pretraining; it replaces a quick bank the demo made, and
# the RI decomposition of the bank it replaces (the next RC + RI run computes the new one).
bank: $(STAMP)
	$(BIN)/rcm-nddr data synth --out data/SYNTH_MT_bank --train 2000 --val 200 --seed 1
	$(BIN)/rcm-nddr pretrain --config configs/synthetic/pretrain.yaml --overwrite --out results/synthetic/resnet18_bank.pth
	rm -f results/synthetic/resnet18_bank_ri.safetensors

# The tests run on every core (at most 4 workers; TEST_WORKERS=0 runs them in this process).
# `test`: the unit and integration tiers; `test-slow`: the slow tier (real processes, TorchDynamo
# tracing, the whole demo); CI (.ci/run) runs both; `test-all` runs everything at once.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST)

# The edit-test loop: the unit tier, without the slow tests.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "unit and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Builds a local stand-in base image (debootstrap + torch from the local wheels) and the project image,
# then trains and tests a tiny task in a container (scripts/docker-smoke.sh; --clean removes the images).
docker-smoke: $(STAMP)
	RCM_NDDR=$(BIN)/rcm-nddr PYTHON=$(BIN)/python scripts/docker-smoke.sh

# What CI runs beside the tests: the smoke and the test suite's end-to-end Docker test in its image, then the
# images and a dockerd it started removed; skipped, with the reason, where no engine can be started.
docker-ci: $(STAMP)
	RCM_NDDR=$(BIN)/rcm-nddr PYTHON=$(BIN)/python scripts/docker-smoke.sh --e2e --clean --stop-engine --skip-without-engine

clean:
	rm -rf $(VENV) results/demo
