# Set-up is part of every target: `make test` or `make train` on a fresh machine installs what it needs.
PYTHON ?= python3
DATA ?= ../shared/data/cifar10-jpeg-train.tar.gz
STAMP := .install.stamp

.PHONY: install test train demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q -rs

train: $(STAMP)
	$(PYTHON) -m cifarlab train --data $(DATA) --recipe seed

clean:
	rm -rf runs .pytest_cache $(STAMP)
