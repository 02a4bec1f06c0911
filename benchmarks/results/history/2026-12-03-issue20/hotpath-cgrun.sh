#!/bin/bash
# cgrun.sh OUTFILE N ARM... : callgrind instructions per arm, two at a time
OUT=$1; N=$2; shift 2
run() { echo "$1 $(CONC=${CONC:-32} KA=600 WARM=300 /tmp/hotpath/cg.sh /tmp/hotpath/$1 plain $N)" >> $OUT; }
while [ $# -gt 0 ]; do
  run $1 &
  if [ $# -gt 1 ]; then run $2 & shift; fi
  shift; wait
done
