#!/usr/bin/env bash
# One-time (and idempotent) setup of a fresh Debian machine with Python 3.11:
#   1. the Debian packages the tests and the main job need (only those missing),
#   2. a virtual environment in .venv with the project and its extras installed in editable mode.
# Re-running is cheap: each step is skipped when already done (the venv step keys on pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
EXTRAS=${SNAP2CAPTION_EXTRAS:-serve,data,train,ray,dev,postgres,ansible}

# command -> Debian package providing it
declare -A DEBIAN_PACKAGES=(
  [java]=default-jre-headless     # pycocoevalcap's PTB tokenizer and METEOR run on Java
  [git]=git                       # DVC and the MLflow git-commit tag
  [prometheus]=prometheus         # the real Prometheus the monitoring tests (and `make up`) run; brings promtool
  [chromium]=chromium             # headless browser for the web page test (driven by Playwright)
  [pg_ctlcluster]=postgresql      # a real PostgreSQL for the inference-log / keys / feedback test on Postgres
  [shellcheck]=shellcheck         # actionlint checks the workflows' run: scripts with it (tests/infra/test_workflows.py)
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

# ---- containers: only when asked (`make test` and `make images` set SNAP2CAPTION_SETUP_CONTAINERS=1) ----
# podman with runc, mmdebstrap (the base image, for machines that reach no container registry) and the CNI
# dnsname plugin (containers find each other by name), then the engine settings podman 4.3 needs on these
# machines, as a drop-in that leaves /etc/containers/containers.conf alone:
# - runtime runc: crun refuses hybrid cgroups ("cgroups in hybrid mode not supported");
# - cgroupfs and file events: there is no systemd;
# - ulimits at or below the hard limits (podman's defaults ask for more and are refused), nproc at most
#   32768, the limit podman gives its container monitor (conmon) here.
if [ "${SNAP2CAPTION_SETUP_CONTAINERS:-0}" = 1 ]; then
  root_cmd=""
  [ "$(id -u)" -eq 0 ] || root_cmd="sudo"
  container_packages=()
  for pkg in podman runc mmdebstrap golang-github-containernetworking-plugin-dnsname; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || container_packages+=("$pkg")
  done
  if [ ${#container_packages[@]} -gt 0 ]; then
    echo "setup: installing Debian packages for containers: ${container_packages[*]}"
    $root_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $root_cmd apt-get install -y -qq --no-install-recommends \
      "${container_packages[@]}"
  fi
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
  [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ] && nofile=1048576
  conf=/etc/containers/containers.conf.d/50-snap2caption.conf
  want="# Written by snap2caption's scripts/setup.sh (why: its containers block).
[containers]
default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"

[network]
network_backend = \"cni\""
  if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    echo "setup: writing $conf"
    $root_cmd mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" | $root_cmd tee "$conf" >/dev/null
  fi
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
