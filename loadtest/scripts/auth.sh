#!/bin/bash
# usage: auth.sh on|off — redeem throughput at 64x16 closed loop, sync durability, with or without client auth
B=$HOME/.cache/giftd/target/release
D=$(mktemp -d /tmp/gbench.XXXX)
echo "$(printf '07%.0s' {1..32})" > $D/k
if [ "$1" = on ]; then printf '[[clients]]\nname = "bench"\nrole = "operator"\nkey_file = "%s"\n' $D/k > $D/c.toml; else : > $D/c.toml; fi
$B/giftd --config $D/c.toml --data-dir $D/data --listen 127.0.0.1:7498 --metrics-listen 127.0.0.1:9498 > $D/out 2> $D/log &
P=$!; sleep 1.5
A=""; [ "$1" = on ] && A="--client bench --key-file $D/k"
$B/giftload --addr 127.0.0.1:7498 --connections 64 --pipeline 16 --duration-secs 8 --cards 10000 --json $A 2>/dev/null | python3 -c "import json,sys; j=json.load(sys.stdin); print('$1', j['audit'], round(j['ops_per_sec']), 'ops/s p50', j['p50_us'], 'p99', j['p99_us'])"
kill $P; wait $P; rm -rf $D
