#!/bin/bash
# Interleaved old/new benchmark driver (run from anywhere).
source /work/venv/bin/activate
export HF_HUB_OFFLINE=1
B=/tmp/perf_bench
declare -A TREE=( [old]=/tmp/perf_old [new]=/work/wt/perf )
for rep in 1 2 3; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== startup $t rep $rep $(date +%T)"
    (cd /work/wt/perf && PYTHONPATH=$d/src python benchmarks/startup.py --runs 3) > $B/startup_${t}_$rep.txt 2>&1
    (cd $d && PYTHONPATH=$d/src python -X importtime -c "import diffusers_sr3" 2> $B/importtime_${t}_$rep.txt)
  done
done
for rep in 1 2 3; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== upscale $t rep $rep $(date +%T)"
    mkdir -p $B/work_${t}_$rep
    (cd $d && TMPDIR=$B/work_${t}_$rep PYTHONPATH=$d/src python benchmarks/upscale.py --sizes 256 --photos 1 --rows fidelity detail --output $B/up_${t}_$rep) > $B/upscale_${t}_$rep.txt 2>&1
  done
done
echo "=== done $(date +%T)"
