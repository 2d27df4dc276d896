#!/bin/bash
# usage: stalled-subscriber.sh — redeem p99 at 4000/s open loop (8x16, 10k cards, 12 s), without and with a
# stalled event subscriber (giftctl events --follow into a pipe nobody reads), on one fresh giftd (sync)
B=$HOME/.cache/giftd/target/release
D=$(mktemp -d /tmp/gbench.XXXX)
$B/giftd --data-dir $D --listen 127.0.0.1:7495 --metrics-listen 127.0.0.1:9495 > $D/log 2>&1 &
P=$!
sleep 1.5
LOAD="$B/giftload --addr 127.0.0.1:7495 --connections 8 --pipeline 16 --rate 4000 --duration-secs 12 --cards 10000 --json"
$LOAD > $D/warm.json 2>/dev/null
[ "$1" != "reverse" ] && $LOAD > $D/alone.json 2>/dev/null
# The subscriber prints into a pipe that is never read: it stops reading its socket once the pipe is full.
( $B/giftctl --addr 127.0.0.1:7495 events --from 0 --follow | sleep 40 ) &
S=$!
sleep 2
$LOAD > $D/stalled.json 2>/dev/null
curl -s 127.0.0.1:9495/metrics | grep -E "^giftd_subscriptions_(open|lag_events)"
if [ "$1" = "reverse" ]; then kill $S 2>/dev/null; pkill -f "giftctl --addr 127.0.0.1:7495"; sleep 2; $LOAD > $D/alone.json 2>/dev/null; fi
python3 - <<PY
import json
for n in ('alone','stalled'):
    w=json.load(open('$D/'+n+'.json'))['workloads'][0]
    print(n, {k:v for k,v in w.items() if k in ('ops_per_sec','p50_us','p99_us','p999_us')})
PY
kill $P; wait $P 2>/dev/null; kill $S 2>/dev/null; pkill -f "giftctl --addr 127.0.0.1:7495" ; rm -rf $D
