#!/usr/bin/env bash
# One-time (and idempotent) setup of a fresh Debian machine with Python 3.11:
#   1. the Debian packages the tests and the main job need (only those missing),
#   2. a virtual environment in .venv with the project and its extras installed in editable mode.
# Re-running is cheap: each step is skipped when already done (the venv step keys on pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
EXTRAS=${SNAP2CAPTION_EXTRAS:-serve,data,train,dev,postgres}

# command -> Debian package providing it
declare -A DEBIAN_PACKAGES=(
  [java]=default-jre-headless     # pycocoevalcap's PTB tokenizer and METEOR run on Java
  [git]=git                       # DVC and the MLflow git-commit tag
  [prometheus]=prometheus         # the real Prometheus the monitoring tests (and `make up`) run; brings promtool
  [chromium]=chromium             # headless browser for the web page test (driven by Playwright)
  [pg_ctlcluster]=postgresql      # a real PostgreSQL for the inference-log / keys / feedback test on Postgres
)

missing=()
for cmd in "${!DEBIAN_PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${DEBIAN_PACKAGES[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, got {sys.version}"'
# A venv left half-made (an interrupted first run) has no working pip: make it again.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.snap2caption-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages (.[${EXTRAS}]) into .venv; the first time takes a few minutes"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchvision first, exactly pinned, so that nothing pulls a different build.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
  echo "$want" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), .venv)"
