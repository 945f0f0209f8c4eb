#!/bin/bash
# Variants of the digits CTM stage side by side on a many-core CPU machine (the device machine's 16 cores:
# 8 runs at 2 threads each), the teacher in $TEACHER (default .exp/digits_teacher). Each line of VARIANTS is
# "name key=value ..." (overrides of configs/digits_ctm.yaml); '#' lines are comments.
# Usage (repo root): [OUT=DIR] [TEACHER=DIR] [THREADS=2] bash benchmarks/digits_grid.sh benchmarks/grids/FILE.txt
# (runs go to $OUT, which the device machine sets; runs/digits_grid elsewhere).
# Prints, per variant: the teacher's FD and (step, FD NFE 1, FD NFE 2) at every evaluation.
set -u
VARIANTS=${1:?usage: digits_grid.sh VARIANTS_FILE}
OUT=${OUT:-$PWD/runs/digits_grid}
mkdir -p "$OUT"; : > "$OUT/done.txt"
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2} CUDA_VISIBLE_DEVICES="" CTM_LAB_CACHE=$PWD/.exp/cache
python3 -c "
from ctm_core import metrics; import time; t=time.time(); metrics.digits_classifier(None); print('classifier', round(time.time()-t,1), 's')"
T=${TEACHER:-$PWD/.exp/digits_teacher}
names=()
while read -r name overrides; do
  case "$name" in ''|'#'*) continue;; esac
  names+=("$name")
  sets=""; for s in $overrides; do sets="$sets --set $s"; done
  ( s0=$(date +%s); python3 -m ctm_core.train --config configs/digits_ctm.yaml --set teacher.checkpoint=$T \
      --set runtime.out_dir=$OUT/$name --set runtime.progress=off --set eval.every=100 $sets > $OUT/$name.log 2>&1;
    echo "$name rc=$? $(( $(date +%s) - s0 ))s" >> $OUT/done.txt ) &
done < "$VARIANTS"
wait
cat $OUT/done.txt
for name in "${names[@]}"; do
  python3 -c "
import json
rows=[json.loads(l) for l in open('$OUT/$name/metrics.jsonl')]
ev=[(r['step'], round(r['eval/fd_digits/nfe1'],3), round(r.get('eval/fd_digits/nfe2',float('nan')),3)) for r in rows if 'eval/fd_digits/nfe1' in r]
t=[r for r in rows if 'eval/fd_digits/teacher_nfe35' in r]
print('$name', 'teacher', round(t[-1]['eval/fd_digits/teacher_nfe35'],3) if t else None, ev)"
done
