#!/usr/bin/env bash
# The tests, from a fresh Debian machine with Python and pip: install what they need, run them.
# Extra arguments go to pytest (e.g. ./test.sh tests/store -x). Ends with pytest's summary line.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # OpenBLAS makes MLX's CPU matmul ~30x faster; docker-registry and skopeo are real
  # OCI peers for the pull/push and package tests; curl is the pull benchmark's baseline;
  # golang-go is Go's own text/template, the reference for Ollama's Go templates;
  # openssh-server lets a scale-out test start a rank over ssh, as on another machine.
  PACKAGES="libopenblas0-pthread docker-registry skopeo curl golang-go openssh-server"
  if ! dpkg -s $PACKAGES >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
  fi
fi

python -m pip install -q --disable-pip-version-check -e ".[test]"
python -m pytest tests -q "$@"
