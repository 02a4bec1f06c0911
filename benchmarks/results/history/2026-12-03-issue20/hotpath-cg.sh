#!/bin/bash
# cg.sh TREE SCENARIO N : instructions (Ir) of the driver's main thread for N requests after warm-up
TREE=$1; S=$2; N=$3
cd $TREE && PYTHONPATH=$TREE WARM=${WARM:-300} valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes --callgrind-out-file=/tmp/hotpath/cg.$$.out --dump-instr=no --collect-jumps=no \
  /work/main/.venv/bin/python /tmp/hotpath/prof.py $S $N cg > /tmp/hotpath/cg.$$.log 2>&1
for f in /tmp/hotpath/cg.$$.out-*; do echo "$f $(grep -m1 "^totals:" $f)"; done > /tmp/hotpath/cg.$$.threads; main=$(sort -k3 -n /tmp/hotpath/cg.$$.threads | tail -1 | awk "{print \$3}")
echo "main=$main all=$(grep -o "Collected : [0-9]*" /tmp/hotpath/cg.$$.log | awk "{print \$3}") failed=$(grep -c failed /tmp/hotpath/cg.$$.log)"
mkdir -p /tmp/hotpath/keep; mv /tmp/hotpath/cg.$$.out* /tmp/hotpath/keep/
