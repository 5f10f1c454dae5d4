#!/usr/bin/env bash
# Janitor benchmark: the full default policy on one generated tree, side by
# side in one run with (1) the seed's own shell commands and (2) the same
# work done with `find | xargs pigz`. Each contender gets a fresh copy of the
# same tree; times are wall-clock medians of ROUNDS runs.
#
#   scripts/bench-janitor.sh [FILES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-4000}
rounds=${2:-3}
command -v pigz >/dev/null || { apt-get update -qq >/dev/null && apt-get install -y -qq pigz >/dev/null; }
cargo build --release -q -p costmesh
bin=${CARGO_TARGET_DIR:-target}/release/costmesh
work=$(mktemp -d /var/tmp/janitor-bench.XXXX)
trap 'rm -rf "$work"' EXIT

python3 - "$work/pristine" "$files" <<'PY'
import os, sys, time, random
root, n = sys.argv[1], int(sys.argv[2])
random.seed(7)
now = time.time()
day = 86400
def put(path, data, age_days):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    t = now - age_days * day
    os.utime(path, (t, t))
for i in range(n):
    age = i % 20
    k = i % 4
    if k in (0, 3):   # half the files are training logs, ~64-190 KiB each
        lines = "".join(f"epoch {i} step {s} loss {random.random():.6f} lr {random.random()*1e-3:.2e}\n" for s in range(1200 + (i % 7) * 400))
        put(f"{root}/logs/run{i % 40}/part{i}.log", lines.encode(), age)
    elif k == 1:
        put(f"{root}/temp/job{i % 13}/t{i}.tmp", os.urandom(4096), age / 4)
    else:
        put(f"{root}/snapshots/s{i}.snap", os.urandom(8192), age * 2.5)
for m in range(10):
    for v in range(6):
        put(f"{root}/models/model{m}/v{v}/weights.bin", os.urandom(256 * 1024), 10 - v)
PY
du -sh "$work/pristine" | sed 's/^/tree: /'
echo "files: $(find "$work/pristine" -type f | wc -l)"

seed_script() { # the seed's commands, made local (gsutil cp/rm -> mkdir/mv/rm)
  cd "$1"
  # model versions: keep the newest 3 of each model
  for m in models/*/; do ls -1dt "$m"*/ | tail -n +4 | xargs -r rm -rf; done
  find ./logs -name "*.log" -mtime +7 -exec gzip {} \;
  mkdir -p archive/logs && find ./logs -name "*.gz" -exec mv {} archive/logs/ \;
  find ./temp -name "*.tmp" -mtime +1 -delete
  find ./snapshots -type f -mtime +30 -delete
}
pigz_pipeline() {
  cd "$1"
  for m in models/*/; do ls -1dt "$m"*/ | tail -n +4 | xargs -r rm -rf; done
  find ./logs -name "*.log" -mtime +7 -print0 | xargs -0 -r pigz
  mkdir -p archive/logs && find ./logs -name "*.gz" -print0 | xargs -0 -r mv -t archive/logs/
  find ./temp -name "*.tmp" -mtime +1 -delete
  find ./snapshots -type f -mtime +30 -delete
}
costmesh_apply() {
  printf '[storage_janitor]\nbase_dir = "%s"\n' "$1" >"$1.toml"
  "$bin" janitor apply --config "$1.toml" >/dev/null
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A results
for name in seed_script pigz_pipeline costmesh_apply; do
  times=()
  for r in $(seq "$rounds"); do
    rm -rf "$work/run"; cp -a "$work/pristine" "$work/run"; sync
    t0=$(date +%s.%N)
    ( $name "$work/run" )
    t1=$(date +%s.%N)
    times+=("$(echo "$t1 - $t0" | bc)")
  done
  results[$name]=$(printf '%s\n' "${times[@]}" | median)
  printf '%-16s median %6.2f s   (runs: %s)\n' "$name" "${results[$name]}" "${times[*]}"
done
printf 'ratio seed/costmesh: %.2f   pigz/costmesh: %.2f\n' \
  "$(echo "${results[seed_script]} / ${results[costmesh_apply]}" | bc -l)" \
  "$(echo "${results[pigz_pipeline]} / ${results[costmesh_apply]}" | bc -l)"
