#!/usr/bin/env bash
# Installs what Waystation needs on a Debian/Ubuntu machine, idempotently:
# Debian packages (when missing) and a virtualenv in .venv with the project in it.
# Usage: scripts/bootstrap.sh [--test]   (--test adds the test tools and the real
# Prometheus/Alertmanager/node_exporter/smartmontools/VictoriaMetrics binaries the tests start)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v python3 >/dev/null || missing+=(python3)
if [ "$want_test" = 1 ]; then
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
  command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
  command -v smartctl >/dev/null || missing+=(smartmontools)
  command -v victoria-metrics >/dev/null || missing+=(victoria-metrics)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)   # regenerates collector/prompb in a test
  command -v openssl >/dev/null || missing+=(openssl)    # test certificates
  command -v git >/dev/null || missing+=(git)            # the fresh-clone test
  # The Debian package test: scripts/build-debs.sh's tools, lintian, systemd-analyze, and
  # Debian's python3 seccomp binding to run the daemons under their units' filters.
  command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
  command -v strip >/dev/null || missing+=(binutils)
  command -v lintian >/dev/null || missing+=(lintian)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  /usr/bin/python3 -c 'import seccomp' 2>/dev/null || missing+=(python3-seccomp)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  # The packages' own services are not wanted: tests start the binaries on loopback ports.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  for svc in prometheus prometheus-node-exporter prometheus-alertmanager victoria-metrics; do
    as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
extras=""
[ "$want_test" = 1 ] && extras="[test]"
stamp=".venv/.installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing waystation$extras into .venv"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".$extras"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "pip install failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
