#!/usr/bin/env bash
# Times the whole NSA (forward, forward+backward; bench_nsa.py --nsa-only) of several
# versions of ejnsa in one run on one GPU, interleaved, so that their ratio is measured
# under the same conditions. Each version is a folder holding an `ejnsa/` package (e.g.
# `git worktree add` of a commit); the current benchmarks/ are copied next to it.
#   tools/gpu/compare_versions.sh RESULTS_DIR T ROUNDS VERSION_DIR...
# (one JSON per version, input and round in RESULTS_DIR; the table goes to stdout)
set -u
out=$1; T=$2; rounds=$3; shift 3
here=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
for v in "$@"; do mkdir -p "$v/benchmarks" && cp "$here"/benchmarks/{bench_nsa.py,_common.py} "$v/benchmarks/"; done
for r in $(seq 1 "$rounds"); do
  for inputs in random coherent; do
    for v in "$@"; do
      name=$(basename "$v")
      echo "=== round $r $inputs $name"
      (cd "$v" && python3 benchmarks/bench_nsa.py --T "$T" --inputs "$inputs" --nsa-only \
         --out "$out/cmp_${name}_${inputs}_r${r}.json" 2>&1 | grep -E "nsa_fwd|nsa_fwdbwd|Error|error" )
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, os, sys, statistics
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "cmp_*.json"))):
    name, inputs = os.path.basename(f)[4:].rsplit("_r", 1)[0].rsplit("_", 1)
    r = json.load(open(f))["rows"][0]
    rows.setdefault((inputs, name), []).append((r.get("nsa_fwd"), r.get("nsa_fwdbwd")))
print(f"{'inputs':9s} {'version':8s} {'fwd ms (rounds)':>28s} {'fwd+bwd ms (rounds)':>28s}")
for (inputs, name), v in sorted(rows.items()):
    print(f"{inputs:9s} {name:8s} {str([x[0] for x in v]):>28s} {str([x[1] for x in v]):>28s}")
PY
