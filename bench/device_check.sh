#!/usr/bin/env bash
# On a lent GPU machine (no network, its own Python with torch): install the wheels `make device-kit` put in
# .whl/, then run `unclip device-check`. Results land in $OUT (device_check.json/.md, log.txt, samples.png,
# samples_two_stage.png).
# From a session: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=590).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check.sh: installing .whl/ failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site
  # compiled once here, not again by each of the check's ~20 processes (the wheels install without bytecode)
  python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1 || true
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 -m jobs.cli device-check --out "$OUT" "$@"
