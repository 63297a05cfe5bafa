# `make book` and `make test` install what is missing (a virtual environment in .venv) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: install data test test-fast demo book clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST is the real dataset available offline: Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FASHION)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "note: Fashion-MNIST not found in $(FASHION); run 'sudo apt-get install dataset-fashion-mnist'" \
	         "or 'riftlab download fashion-mnist' (tests that need it are skipped)"; \
	  fi; \
	fi

test: $(STAMP) data
	$(PY) -m pytest -q

test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/riftlab demo --out runs/demo --overwrite

book: $(STAMP) data demo

clean:
	rm -rf _build runs .pytest_cache
