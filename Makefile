# The two commands of the README's quick start:
#   make up    set everything up on a fresh machine and run the system on loopback
#   make test  set everything up and run the whole test suite (what CI runs)
.PHONY: setup up test data clean

setup:
	bash scripts/setup.sh

up: setup
	.venv/bin/snap2caption up

test: setup
	bash scripts/test.sh

# The DVC pipeline alone (synthetic data -> ETL); `make up` runs it when its outputs are missing.
data: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
