#!/bin/bash
# usage: batch.sh [connections] [pipeline] [workload] — redeems/s in batch frames of 8,192 redeems on a fresh giftd (sync);
# workload "batch" (independent items, the default), "batch-atomic" (all or nothing) or "batch-each" (independent
# items under the batch's key); BIN=dir for other binaries
B=${BIN:-$HOME/.cache/giftd/target/release}
C=${1:-2}; PL=${2:-2}; WL=${3:-batch}
D=$(mktemp -d /tmp/gbench.XXXX)
$B/giftd --data-dir $D --listen 127.0.0.1:7499 --metrics-listen 127.0.0.1:9499 > $D/log 2>&1 &
P=$!
sleep 1.5
$B/giftload --addr 127.0.0.1:7499 --connections $C --pipeline $PL --duration-secs 8 --cards 65536 --workload $WL --json > $D/out.json
python3 -c "
import json
d=json.load(open('$D/out.json')); w=d['workloads'][0] if 'workloads' in d else d
print('$WL', {k:v for k,v in w.items() if k in ('ops_per_sec','p50_us','p99_us','errors')})
"
kill $P; wait $P; rm -rf $D
