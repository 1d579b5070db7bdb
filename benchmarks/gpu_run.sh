#!/usr/bin/env bash
# Runs benchmarks/gpu_speed.py on the GPU machine, one part per process, each under its own
# time limit within one budget for all, as ../shared/device/README.md describes. Run it from
# the repository root with .device/ (from `bash ../shared/device/pack.sh 2000`) carried along:
#
#     bash benchmarks/gpu_run.sh            # logs, JSON and summary.txt in $OUT
#
# BUDGET (seconds, default 480) bounds all parts together; a part that would start with less
# than 20 s left is skipped. The summary (tables, RESULT line) is printed last and saved in
# $OUT/summary.txt; each part's log is $OUT/PART.log, its results $OUT/PART.json (written after
# every measurement, so a part stopped by its limit keeps what it measured).
set -u
OUT=${OUT:-/tmp/gpu-speed-out}
BUDGET=${BUDGET:-480}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$SITE"
log() { echo "$*" | tee -a "$OUT/driver.log"; }

# The packages the machine lacks travel in .device/site.tar.xz: without them the run would spend
# its GPU time on parts that fail, so it stops here, before the first part.
stop() {
  log "stop: $* -- run 'bash ../shared/device/pack.sh 2000' in the checkout and carry .device along"
  exit 2
}
[ -f .device/site.tar.xz ] || stop "no .device/site.tar.xz (simplejpeg and the packages it carries)"
tar xJf .device/site.tar.xz -C "$SITE" || stop "could not unpack .device/site.tar.xz"
[ -f .device/data/cifar10-subset.zip ] || log "no .device/data/cifar10-subset.zip: part pretrain will fail"
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 KINFONCE_CACHE=${KINFONCE_CACHE:-/tmp/kc}
python3 -c "import simplejpeg" 2>> "$OUT/driver.log" ||
  stop "simplejpeg does not import from .device/site.tar.xz (built for another Python?)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, simplejpeg; print('torch', torch.__version__, 'simplejpeg', simplejpeg.__version__)" \
  2>&1 | tee -a "$OUT/driver.log"

start=$SECONDS
run() {  # run PART LIMIT_SECONDS
  local left=$((BUDGET - (SECONDS - start)))
  local limit=$(($2 < left ? $2 : left))
  if [ "$limit" -lt 20 ]; then
    log "skip $1: ${left}s of the budget left"
    return
  fi
  log "== $1 (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" python3 benchmarks/gpu_speed.py --part "$1" --json "$OUT/$1.json" \
    > "$OUT/$1.log" 2>&1
  log "$1: exit $? after $((SECONDS - start))s"
}

# most important first; compilation (slowest, needs a C compiler for Triton) last
run loss 120
run step 90
run eval 90
run peer 90
run pretrain 120
run clip 90
run compile 150
python3 benchmarks/gpu_speed.py --summary "$OUT" 2>&1 | tee "$OUT/summary.txt"
