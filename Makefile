# The two set-up commands (README): `make train` runs the built-in pretraining job, `make test` runs the tests.
# Both create .venv/ first when needed (scripts/setup_env.sh).
PY := .venv/bin/python

.PHONY: venv train test gpu-test

venv:
	@bash scripts/setup_env.sh

train: venv
	$(PY) train.py $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

gpu-test: venv
	$(PY) -m pytest -q tests/gpu $(ARGS)
