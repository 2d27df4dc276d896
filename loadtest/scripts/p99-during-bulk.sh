#!/bin/bash
# usage: p99-during-bulk.sh [chunk] [window] — redeem p99 during a 1M activation, with WAL fsync/write histograms (sync);
# NOBULK=1: the same run with no activation (the baseline)
B=${BIN:-$HOME/.cache/giftd/target/release}
CH=${1:-1024}; W=${2:-4}
D=$(mktemp -d /tmp/gbench.XXXX)
$B/giftd --data-dir $D --listen 127.0.0.1:7499 --metrics-listen 127.0.0.1:9499 ${CONFIG:+--config $CONFIG} > $D/log 2>&1 &
P=$!
sleep 1.5
$B/giftctl --addr 127.0.0.1:7499 --json bulk issue --first 6035730000000000 --count 1000000 --amount 10.00 --currency USD --job inv --chunk $CH --window $W > /dev/null
sleep 20
LOAD="$B/giftload --addr 127.0.0.1:7499 --connections 8 --pipeline 16 --rate 4000 --duration-secs 12 --cards 10000 --json"
curl -s 127.0.0.1:9499/metrics > $D/m0
( sleep 2; [ -n "$NOBULK" ] && echo 0 > $D/act.time && echo '{}' > $D/act.json && exit; /usr/bin/time -f "%e" -o $D/act.time $B/giftctl --addr 127.0.0.1:7499 --json bulk activate --first 6035730000000000 --count 1000000 --amount 5.00 --currency USD --job act --chunk $CH --window $W > $D/act.json ) &
A=$!
$LOAD > $D/during.json 2>/dev/null
wait $A
curl -s 127.0.0.1:9499/metrics > $D/m1
python3 - <<PY
import json,re
d=json.load(open('$D/during.json'))
w=d['workloads'][0] if 'workloads' in d else d
print('during', {k:v for k,v in w.items() if k.endswith('_us') or k=='ops_per_sec'})
print('activation secs', open('$D/act.time').read().strip())
def hist(path,name):
    h={}
    for l in open(path):
        m=re.match(name+r'_bucket\{le="([^"]+)"\} (\S+)',l)
        if m: h[m.group(1)]=float(m.group(2))
    return h
for name in ['giftd_wal_fsync_seconds','giftd_wal_write_seconds','giftd_wal_group_size']:
    a=hist('$D/m0',name); b=hist('$D/m1',name)
    print(name, {k:int(b[k]-a.get(k,0)) for k in b})
PY
kill $P; wait $P; cp $D/log ${LOG_COPY:-/dev/null}; rm -rf $D
