#!/bin/bash
# Digits CTM grid on the device's CPU cores: 8 variants at 2 threads each, the teacher carried in as
# .exp/digits_teacher. Usage (device machine, repo root): bash benchmarks/results/digits_grid.sh 1|2
set -u
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 CUDA_VISIBLE_DEVICES="" CTM_LAB_CACHE=$PWD/.exp/cache
python3 -c "
from ctm_core import metrics; import time; t=time.time(); metrics.digits_classifier(None); print('classifier', round(time.time()-t,1), 's')"
T=$PWD/.exp/digits_teacher
declare -A V
ROUND=${1:-1}   # two rounds of 8 runs (16 cores); the second after reading the first
if [ "$ROUND" = 1 ]; then
V[v0_base]=""
V[v1_gan05]="loss.lambda_gan=0.05"
V[v2_lr2e3]="optim.lr=2e-3"
V[v3_K17]="ctm.max_steps=17"
V[v4_dsm01]="loss.lambda_dsm=0.1"
V[v5_dadam]="gan.optimizer=adam"
V[v6_dsm0]="loss.lambda_dsm=off"
V[v7_gan01]="loss.lambda_gan=0.1"
else
V[w0_dsm01_lr2e3]="loss.lambda_dsm=0.1 optim.lr=2e-3"
V[w1_dsm005]="loss.lambda_dsm=0.05"
V[w2_dsm01_gan05]="loss.lambda_dsm=0.1 loss.lambda_gan=0.05"
V[w3_ema98]="ema.rates=[0.98] ema.eval_rate=0.98"
V[w4_dsm01_ema98]="loss.lambda_dsm=0.1 ema.rates=[0.98] ema.eval_rate=0.98"
V[w5_dsm01]="loss.lambda_dsm=0.1"
V[w6_dsm01_K10]="loss.lambda_dsm=0.1 ctm.max_steps=10"
V[w7_base]=""
fi
for k in "${!V[@]}"; do
  sets=""; for s in ${V[$k]}; do sets="$sets --set $s"; done
  ( s0=$(date +%s); python3 -m ctm_core.train --config configs/digits_ctm.yaml --set teacher.checkpoint=$T \
      --set runtime.out_dir=$OUT/$k --set runtime.progress=off --set eval.every=100 $sets > $OUT/$k.log 2>&1;
    echo "$k rc=$? $(( $(date +%s) - s0 ))s" >> $OUT/done.txt ) &
done
wait
cat $OUT/done.txt
for k in $(ls $OUT | grep -E '^[vw][0-9]' | grep -v log); do
  python3 -c "
import json,sys
rows=[json.loads(l) for l in open('$OUT/$k/metrics.jsonl')]
ev=[(r['step'], round(r['eval/fd_digits/nfe1'],3), round(r.get('eval/fd_digits/nfe2',float('nan')),3)) for r in rows if 'eval/fd_digits/nfe1' in r]
t=[r for r in rows if 'eval/fd_digits/teacher_nfe35' in r]
print('$k', 'teacher', round(t[-1]['eval/fd_digits/teacher_nfe35'],3) if t else None, ev)"
done
