# The two commands of the README: `make lab` (run the course) and `make test` (run every test and notebook).
# Both run scripts/setup.py, the one set-up program (Windows runs it directly: `py -3.11 scripts\setup.py lab`),
# which creates .venv and builds the embedded model when they are missing; a second run does no set-up work.
# Options: PYTHON (the interpreter that creates .venv), VENV, PORT, GPU=none|cuda, TORCH_SPEC, TORCH_INDEX_URL.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8888
SETUP = $(PYTHON) scripts/setup.py $(if $(GPU),--gpu $(GPU))
HAVE_PYTHON = command -v "$(PYTHON)" >/dev/null 2>&1 || { echo "setup error: no '$(PYTHON)' on PATH. Install Python \
3.10 or newer (3.11 recommended), or run: make test PYTHON=/path/to/python3.11" >&2; exit 1; }
export VENV PORT

.PHONY: lab test setup gpu-results clean-env help

help:
	@echo "make lab    - set up (first time only) and open JupyterLab on notebooks/"
	@echo "make test   - set up (first time only), then the linter (ruff), unit tests and every notebook through nbval"
	@echo "make gpu-results - (CUDA machine) record every GPU figure the course shows into results/"

setup:
	@$(HAVE_PYTHON)
	@$(SETUP) install

lab:
	@$(HAVE_PYTHON)
	@$(SETUP) lab

test:
	@$(HAVE_PYTHON)
	@$(SETUP) test

gpu-results: setup
	$(VENV)/bin/python -m helpers record $(if $(BUDGET_S),--budget-s $(BUDGET_S))

clean-env:
	rm -rf $(VENV)
