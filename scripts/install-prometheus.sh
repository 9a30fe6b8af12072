#!/usr/bin/env bash
# Prometheus and promtool from Debian's `prometheus` package, for the metrics test (tests/test_prometheus.py),
# which starts its own Prometheus on loopback. Installs nothing when both are already on the PATH.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
install() { $sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
# the package lists may be missing or old on a fresh machine: refresh them once when the first try fails
install || { $sudo apt-get update -q >/dev/null && install; }
prometheus --version 2>&1 | head -n 1
