#!/bin/bash
# usage: bulk.sh ID [chunk] [window] — 1M issue then 1M activation on a fresh giftd (sync durability); BIN=dir for other binaries
B=${BIN:-$HOME/.cache/giftd/target/release}
R=$1; CH=${2:-4096}; W=${3:-4}
D=$(mktemp -d /tmp/gbench.XXXX)
$B/giftd --data-dir $D --listen 127.0.0.1:7499 --metrics-listen 127.0.0.1:9499 > $D/log 2>&1 &
P=$!
sleep 1.5
t0=$(date +%s.%N)
$B/giftctl --addr 127.0.0.1:7499 --json bulk issue --first 6035730000000000 --count 1000000 --amount 10.00 --currency USD --job inv-$R --chunk $CH --window $W > $D/issue.json
t1=$(date +%s.%N)
$B/giftctl --addr 127.0.0.1:7499 --json bulk activate --first 6035730000000000 --count 1000000 --amount 5.00 --currency USD --job act-$R --chunk $CH --window $W > $D/act.json
t2=$(date +%s.%N)
python3 -c "
import json
i=json.load(open('$D/issue.json')); a=json.load(open('$D/act.json'))
ti=$t1-$t0; ta=$t2-$t1
print('issue', i['summary'], round(1e6/ti), 'cards/s', round(ti,2),'s')
print('activate', a['summary'], round(1e6/ta), 'cards/s', round(ta,2),'s')
"
kill $P; wait $P; rm -rf $D
