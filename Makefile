# The two commands of the README: `make lab` (run the course) and `make test` (run every test and notebook).
# Both create .venv and build the embedded model when they are missing; a second run does no work.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8888
export PYTHON VENV

.PHONY: lab test setup gpu-results clean-env help

help:
	@echo "make lab    - set up (first time only) and open JupyterLab on notebooks/"
	@echo "make test   - set up (first time only), then the linter (ruff), unit tests and every notebook through nbval"
	@echo "make gpu-results - (CUDA machine) record every GPU figure the course shows into results/"

setup:
	@bash scripts/setup.sh

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

test: setup
	$(VENV)/bin/python -m ruff check helpers tests scripts conftest.py
	$(VENV)/bin/python -m pytest

gpu-results: setup
	$(VENV)/bin/python -m helpers record

clean-env:
	rm -rf $(VENV)
