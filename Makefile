# The two commands of the README's quick start:
#   make up    set everything up on a fresh machine and run the system on loopback
#   make test  set everything up and run the whole test suite (what CI runs)
.PHONY: setup up test data images clean

setup:
	bash scripts/setup.sh

up: setup
	.venv/bin/snap2caption up

# The container test (tests/containers/) runs in the suite: setup installs podman for it.
test: export SNAP2CAPTION_SETUP_CONTAINERS = 1
test: setup
	bash scripts/test.sh

# The DVC pipeline alone (synthetic data -> ETL); `make up` runs it when its outputs are missing.
data: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro

# The container images (Dockerfile targets) with podman, on a Debian base made by mmdebstrap where no
# registry is reachable; `bash scripts/images.sh serving` builds one. Then: podman-compose up -d (README).
images: export SNAP2CAPTION_SETUP_CONTAINERS = 1
images: setup
	bash scripts/images.sh

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
