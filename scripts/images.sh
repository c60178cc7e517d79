#!/usr/bin/env bash
# Build Snap2Caption's images (Dockerfile targets) with podman or docker: `make images`, or
#   bash scripts/images.sh [TARGET...]      TARGET: serving etl training mlflow postgres prometheus (default: all)
#
# Environment:
#   SNAP2CAPTION_ENGINE       podman or docker [default: podman when installed, else docker]
#   SNAP2CAPTION_IMAGE_TAG    tag of the images built, snap2caption-<target>:<tag> [default: latest]
#   SNAP2CAPTION_BASE_IMAGE   the BASE_IMAGE to build on. Default: where mmdebstrap is installed (setup.sh
#                             installs it for the tests), a Debian bookworm + Python 3.11 image made from
#                             Debian's packages, for machines that reach no container registry; elsewhere
#                             python:3.11-slim-bookworm.
#   SNAP2CAPTION_TORCH_INDEX_URL  where the training image gets torch (e.g. https://download.pytorch.org/whl/cpu
#                             for a CPU-only image); unset: the wheels of the host's pip sources, then PyPI.
#
# The mmdebstrap base is tagged with a hash of its recipe below, so it is made once (~1 min) and reused by
# every later build until the recipe changes (SNAP2CAPTION_REBUILD_BASE=1 forces a new one, e.g. to pick up
# Debian's security updates). The project images reuse the engine's layer cache: the dependency layers are
# keyed on pyproject.toml alone, so a code change rebuilds only the layers that copy the code.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${SNAP2CAPTION_ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
TAG=${SNAP2CAPTION_IMAGE_TAG:-latest}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(serving etl training mlflow postgres prometheus)

# What python:3.11-slim-bookworm gives (Python 3.11 with venv, CA certificates, no docs), from Debian.
BASE_RECIPE=(
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  bookworm
)

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

base_image() {
  if [ -n "${SNAP2CAPTION_BASE_IMAGE:-}" ]; then
    echo "$SNAP2CAPTION_BASE_IMAGE"
    return
  fi
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "python:3.11-slim-bookworm"
    return
  fi
  local hash image
  hash=$(printf '%s\n' "${BASE_RECIPE[@]}" | sha256sum | cut -c1-12)
  image="localhost/snap2caption-base:$hash"
  if [ "${SNAP2CAPTION_REBUILD_BASE:-0}" != 1 ] && "$ENGINE" image inspect "$image" >/dev/null 2>&1; then
    echo "images: base $image (reused: its recipe is unchanged)" >&2
  else
    local started tmp
    started=$(seconds)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    echo "images: building the base image $image with mmdebstrap (Debian bookworm, Python 3.11)" >&2
    "${BASE_RECIPE[@]}" "$tmp/base.tar" >"$tmp/mmdebstrap.log" 2>&1 \
      || { tail -20 "$tmp/mmdebstrap.log" >&2; echo "images: mmdebstrap failed" >&2; return 1; }
    "$ENGINE" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tmp/base.tar" "$image" >/dev/null
    echo "images: base built in $(elapsed "$started") s" >&2
  fi
  echo "$image"
}

fill_wheelhouse() {
  # torch and torchvision (with their CUDA wheels: several GB) from wherever the host's pip finds them;
  # pip download skips the files already there.
  local pip=.venv/bin/python
  [ -x "$pip" ] || pip=python3
  echo "images: collecting torch wheels into infra/containers/wheels" >&2
  python3 scripts/requirements.py pyproject.toml --only torch,torchvision train \
    | "$pip" -m pip download --quiet --dest infra/containers/wheels -r /dev/stdin
}

BASE=$(base_image)
build_args=(--build-arg "BASE_IMAGE=$BASE")
# HEALTHCHECK is a Docker-format instruction: podman's default OCI format would drop it.
[ "$ENGINE" = podman ] && build_args+=(--format docker)
# The host's CA bundle, as a build secret (never in a layer): pip in the builds trusts what the host trusts.
ca=${SNAP2CAPTION_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] && build_args+=(--secret "id=ca-bundle,src=$ca")

summary=()
for target in "${TARGETS[@]}"; do
  args=("${build_args[@]}")
  if [ "$target" = training ]; then
    if [ -n "${SNAP2CAPTION_TORCH_INDEX_URL:-}" ]; then
      args+=(--build-arg "TORCH_INDEX_URL=$SNAP2CAPTION_TORCH_INDEX_URL")
    else
      fill_wheelhouse
    fi
  fi
  image="snap2caption-$target:$TAG"
  echo "images: building $image" >&2
  started=$(seconds)
  "$ENGINE" build "${args[@]}" --target "$target" --tag "$image" . >&2
  took=$(elapsed "$started")
  size=$("$ENGINE" image inspect --format '{{.Size}}' "$image")
  summary+=("$(awk -v i="$image" -v s="$size" -v t="$took" 'BEGIN { printf "%-34s %6.0f MB  built in %6.1f s", i, s / 1e6, t }')")
done
echo "images: built on $BASE"
printf '%s\n' "${summary[@]}"
