# The two commands of the README. Each creates its environment on first use (Python >= 3.10 and pip needed):
#   make demo   - install, then run the whole pipeline on a tiny model (CPU, no download)
#   make test   - install, then run the test suite on transformers 5.x and on transformers 4.57.6
PYTHON ?= python3
VENV ?= .venv
VENV_T457 ?= .venv-t457
PIP_INSTALL = bin/pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test test-t5 test-t457 clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/$(PIP_INSTALL) -e ".[test,train,video,quant,ray,serve]"
	touch $@

$(VENV_T457)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV_T457)
	$(VENV_T457)/$(PIP_INSTALL) -e ".[test,train,video,quant,ray,serve]" "transformers==4.57.6"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/qscorer demo

test: test-t5 test-t457

test-t5: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-t457: $(VENV_T457)/.installed
	$(VENV_T457)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_T457) demo_out
