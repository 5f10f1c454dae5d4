#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/install-test-deps.sh),
# then runs every test of the workspace. Tests start their own nats-server and
# redis-server on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo test --workspace --locked "$@"
# Alert rules: syntax and unit tests (Debian's prometheus package).
promtool check config compose/prometheus/prometheus.yml
promtool check rules compose/prometheus/alerts.yml
promtool test rules compose/prometheus/alerts.test.yml
# The compose deployment parses and resolves (no container engine needed).
docker-compose -f compose/docker-compose.yml config -q
