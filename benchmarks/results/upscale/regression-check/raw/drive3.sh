#!/bin/bash
# Continue: wait for new rep 1's upscale (pid 12426), then fidelity reps 2-4, importtime+startup reps 1-3, interleaved.
source /work/venv/bin/activate
export HF_HUB_OFFLINE=1
B=/tmp/perf_bench
declare -A TREE=( [old]=/tmp/perf_old [new]=/work/wt/perf )
while kill -0 12426 2>/dev/null; do sleep 2; done
echo "=== new rep 1 done $(date +%T)"
for rep in 2 3 4; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== upscale fidelity $t rep $rep $(date +%T) $(cat /proc/loadavg)"
    mkdir -p $B/work_${t}_$rep
    (cd $d && TMPDIR=$B/work_${t}_$rep PYTHONPATH=$d/src python benchmarks/upscale.py --sizes 256 --photos 1 --rows fidelity --output $B/up_${t}_$rep) > $B/upscale_${t}_$rep.txt 2>&1
  done
done
for rep in 1 2 3; do
  for t in old new; do
    d=${TREE[$t]}
    echo "=== startup $t rep $rep $(date +%T) $(cat /proc/loadavg)"
    (cd $d && PYTHONPATH=$d/src python -X importtime -c "import diffusers_sr3" 2> $B/importtime_${t}_$rep.txt)
    (cd /work/wt/perf && PYTHONPATH=$d/src python benchmarks/startup.py --runs 1) > $B/startup_${t}_$rep.txt 2>&1
  done
done
echo "=== done $(date +%T)"
