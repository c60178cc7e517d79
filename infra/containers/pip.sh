#!/bin/sh
# pip inside an image build, trusting the builder's CA bundle when the build passes one as the secret
# `ca-bundle` (scripts/images.sh passes the host's: a TLS-intercepting proxy the host trusts then works in
# builds too). A secret mount, so the bundle never lands in a layer; without it pip keeps its own CAs.
set -eu
if [ -f /run/secrets/ca-bundle ]; then
  export PIP_CERT=/run/secrets/ca-bundle
fi
exec /opt/venv/bin/python -m pip --no-cache-dir --disable-pip-version-check "$@"
