#!/bin/bash
# usage: cg_run.sh TREE RATIO N TAG  -> prints Ir per request
TREE=$1; RATIO=$2; N=$3; TAG=$4
OUT=/tmp/telemetry/cg/$TAG
mkdir -p $OUT; rm -f $OUT/callgrind.out*
PY=/work/main/.venv/bin/python
STUBPORT=$($PY -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
$PY $TREE/benchmarks/stub_upstream.py --port $STUBPORT >/dev/null 2>&1 & SP=$!
exec 3< <(cd /work/wt/telemetry && PYTHONPATH=/work/wt/telemetry $PY -m testsupport.otlp_receiver)
RP=$!
read -u 3 RECV
sleep 1
cd $OUT && STUB=$STUBPORT RECV=$RECV PYTHONPATH=$TREE valgrind --tool=callgrind --instr-atstart=no --trace-children=no --callgrind-out-file=$OUT/callgrind.out.%p $PY /tmp/telemetry/cg_worker.py $RATIO $N >$OUT/log 2>&1
kill $SP $RP 2>/dev/null
F=$(ls $OUT/callgrind.out.*.1 2>/dev/null | head -1)
[ -z "$F" ] && F=$(ls -S $OUT/callgrind.out.* | head -1)
IR=$(grep -h "^summary:\|^totals:" $F | head -1 | awk '{print $2}')
grep -h "non-200" $OUT/log | tr "\n" " "; echo "$TAG ratio=$RATIO n=$N Ir=$IR per_request=$((IR / N))"
