# Entry points for people: `make quick` (CPU-sized run), `make paper` (the study's run),
# `make paper-recipe` (Ho et al.'s CIFAR-10 recipe, configs/ddpm-paper.yaml), `make test`.
# `make quick SOURCE=path/to/cifar-10-python.tar.gz` (or SOURCE=official) picks the data.
# `make compare A=NAME B=NAME`: two experiments side by side, the params and metrics that differ.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup setup-browser quick compare paper paper-recipe test test-fast lint app inception-random clean-exps

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench,app,wandb]'
	touch $@

setup: $(VENV)/.installed

setup-browser:        ## Debian's Chromium, for the app's browser test (as root, or through sudo)
	command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

app: setup            ## the demo app on the pipeline's model, at http://127.0.0.1:7860
	python -m ddpm_cifar.app --checkpoint models/ema.pt

quick: setup          ## the whole DAG at CPU size on real CIFAR-10, as a DVC experiment (about 12 min on 2 cores, .venv included)
	python scripts/run_preset.py configs/quick.yaml $(if $(SOURCE),--source $(SOURCE))

compare: setup        ## two experiments side by side, the params and metrics that differ (make compare A=NAME B=NAME)
	@[ -n "$(A)" ] && [ -n "$(B)" ] || { echo "error: name two experiments: make compare A=NAME B=NAME \
	(their names: dvc exp list)" >&2; exit 2; }
	dvc exp diff '$(A)' '$(B)'

paper: setup          ## the study's experiment, exactly as params.yaml says
	dvc repro

paper-recipe: setup   ## Ho et al. 2020's CIFAR-10 training and FID as a DVC experiment (GPU-days: docs/recipes.md)
	python scripts/run_preset.py configs/ddpm-paper.yaml --workspace $(if $(SOURCE),--source $(SOURCE))

test: setup setup-browser   ## the suite, browser tests included (with CI set, a missing browser fails them)
	python -m pytest -q

test-fast: setup setup-browser   ## the suite without its slow tier (tests over ~10 s): under 3 min on 2 cores
	python -m pytest -q -m "not slow"

lint: setup
	ruff check src stages tests scripts benchmarks

inception-random: setup   ## random-weight Inception for offline smoke runs (FID flagged non-comparable)
	python scripts/make_random_inception.py data/inception/inception-random-seed0.pth

clean-exps: setup     ## remove what killed `dvc exp run --temp` runs left (.dvc/tmp/exps/), never a running one's
	@python scripts/run_preset.py --clean
