#!/bin/bash
# After drive4: detail reps 2-3, interleaved.
source /work/venv/bin/activate
export HF_HUB_OFFLINE=1
B=/tmp/perf_bench
declare -A TREE=( [old]=/tmp/perf_old [new]=/work/wt/perf )
while pgrep -f "^/bin/bash ./drive4.sh" >/dev/null; do sleep 2; done
for rep in 2 3; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== upscale detail $t rep $rep $(date +%T) $(cat /proc/loadavg)"
    mkdir -p $B/workd_${t}_$rep
    (cd $d && TMPDIR=$B/workd_${t}_$rep PYTHONPATH=$d/src python benchmarks/upscale.py --sizes 256 --photos 1 --rows detail --output $B/upd_${t}_$rep) > $B/upscaled_${t}_$rep.txt 2>&1
  done
done
echo "=== done $(date +%T)"
