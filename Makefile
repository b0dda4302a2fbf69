# Set-up is part of every target: `make test` or `make train` on a fresh machine installs what it needs.
PYTHON ?= python3
# the shared JPEG images where this checkout has them beside it, else the official CIFAR-10 download
DATA ?= $(wildcard ../shared/data/cifar10-jpeg-train.tar.gz)
STAMP := .install.stamp

.PHONY: install test train docs-cli docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q -rs

train: $(STAMP)
	@echo "make train: the seed recipe on $(if $(DATA),$(DATA),the official CIFAR-10 archive (downloaded once into the cache; no ../shared/data here))"
	$(PYTHON) -m cifarlab train $(if $(DATA),--data $(DATA),--dataset cifar10) --recipe seed $(ARGS)

# the command reference, from the parser (tests/test_cli_docs.py fails when it is stale)
docs-cli: $(STAMP)
	$(PYTHON) -m cifarlab.cli_docs > docs/cli.md

# the documentation site: MkDocs (Material) over docs/, into site/
docs: $(STAMP)
	$(PYTHON) -m mkdocs build --strict --site-dir site

clean:
	rm -rf runs site build dist .pytest_cache $(STAMP)
