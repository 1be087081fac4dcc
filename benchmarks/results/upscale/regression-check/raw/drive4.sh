#!/bin/bash
# After drive3: equal thread counts (the benchmark's "fidelity, 1 thread" row), interleaved, 3 reps.
source /work/venv/bin/activate
export HF_HUB_OFFLINE=1
B=/tmp/perf_bench
declare -A TREE=( [old]=/tmp/perf_old [new]=/work/wt/perf )
while pgrep -f "^/bin/bash ./drive3.sh" >/dev/null; do sleep 2; done
for rep in 1 2 3; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== upscale 1thread $t rep $rep $(date +%T) $(cat /proc/loadavg)"
    mkdir -p $B/work1t_${t}_$rep
    (cd $d && TMPDIR=$B/work1t_${t}_$rep PYTHONPATH=$d/src python benchmarks/upscale.py --sizes 256 --photos 1 --rows "fidelity, 1 thread" --output $B/up1t_${t}_$rep) > $B/upscale1t_${t}_$rep.txt 2>&1
  done
done
echo "=== done $(date +%T)"
