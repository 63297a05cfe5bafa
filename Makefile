# `make book` and `make test` install what is missing (a virtual environment in .venv) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: install data test test-fast test-notebooks demo notebooks book html mathjax check-pages clean

# The notebooks' stored outputs are compared digit for digit (nbval), and CPU kernels round differently with
# the instruction set they pick (AVX-512 or AVX2, on Intel or AMD): pin the common one (AVX2) for every run
# that writes or checks them, so that a machine of another x86 kind computes the same numbers.
PINS := $(if $(filter x86_64,$(shell uname -m)),ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2,)

# MathJax, vendored from the npm registry (one self-contained file), so that formulas render in a book opened offline.
MATHJAX_VERSION := 3.2.2
MATHJAX := book/_static/mathjax/tex-svg.js

# The committed, executed notebooks that `make test` re-runs with nbval: every notebook except the
# papermill template (its executed copies, notebooks/rift_*.ipynb, are checked instead).
TEMPLATE := notebooks/06_rift_end_to_end.ipynb
EXECUTED := $(filter-out $(TEMPLATE),$(sort $(wildcard notebooks/*.ipynb)))
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg --nbval-cell-timeout 1800 -p no:cacheprovider

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	# the optional RobustBench extra too, so tests/test_robustbench.py runs instead of skipping
	$(PY) -m pip install -q "robustbench>=1.1.1" "setuptools<81"
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

# The pytest suite, then the notebooks re-executed and compared with their stored outputs (nbval;
# stderr and images are not compared, timings/paths masked: notebooks/conftest.py, book/nbval_sanitize.cfg).
test: $(STAMP) data
	$(PY) -m pytest -q --durations=15
	$(MAKE) --no-print-directory test-notebooks

test-notebooks: $(STAMP) data
	$(PINS) $(PY) -m pytest -q $(NBVAL) $(EXECUTED)

test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/riftlab demo --out runs/demo --overwrite

# Execute every notebook with papermill (chapters 1-5 in place, the chapter-7 template once per dataset
# shape, then the results page; the first failure stops here, naming the notebook and the cell), then
# build the HTML with execution off and warnings as errors. Output: _build/html.
notebooks: $(STAMP) data
	$(PINS) $(PY) book/run_notebooks.py

book: notebooks html

# The HTML from the notebooks as they are (execution off: a minute), with MathJax vendored.
html: $(STAMP) $(MATHJAX)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going --path-output .

mathjax: $(MATHJAX)

$(MATHJAX):
	@command -v npm >/dev/null || { echo "vendoring MathJax needs npm (apt-get install npm)"; exit 1; }
	@mkdir -p $(dir $(MATHJAX))
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null && tar xzf mathjax-$(MATHJAX_VERSION).tgz package/es5/tex-svg.js) \
	  && cp $$tmp/package/es5/tex-svg.js $(MATHJAX) && rm -rf $$tmp && echo "vendored MathJax $(MATHJAX_VERSION) into $(MATHJAX)"

# Screenshots and checks of the built pages in headless Chromium (installs chromium and selenium if
# missing). Screenshots land in _build/screenshots.
check-pages: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "check-pages needs chromium and chromium-driver (apt-get install chromium chromium-driver)"; exit 1; fi; }
	$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install -q "selenium>=4.10"
	@test -f _build/html/index.html || { echo "no _build/html: run 'make book' first"; exit 1; }
	$(PY) book/check_pages.py _build/html --screenshots _build/screenshots

clean:
	rm -rf _build runs .pytest_cache artifacts book/_static/mathjax
