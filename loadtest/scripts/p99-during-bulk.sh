#!/bin/bash
# usage: p99-during-bulk.sh [chunk] [window] — redeem p99 during a 1M activation, with WAL fsync/write histograms (sync);
# NOBULK=1: the same run with no activation (the baseline). "job" is the p99 of the redeems sent
# while the activation ran; "whole" of every redeem of the run. "job window, server": giftd's own
# histograms over the activation (scraped as it starts and ends), with the bucket that holds their p99.
# CTL_PREFIX="chrt -i 0": the activation's giftctl under SCHED_IDLE, standing in for a reseller's
# client on a machine of its own (here it shares giftd's 2 cores with giftload).
# SECS=N: the redeem load's seconds (default 15: a paced activation takes about 10 s, from second 2).
# HOG=N: N busy loops (`yes`) beside the load for its seconds: plain CPU contention, no IO, the control
# for what a job's CPU alone does to the tail. "job window, CPU": CPU seconds by thread (giftd's
# grouped by name, from /proc) over the activation, against the 2 × its seconds the cores had.
B=${BIN:-$HOME/.cache/giftd/target/release}
CH=${1:-1024}; W=${2:-4}
D=$(mktemp -d /tmp/gbench.XXXX)
$B/giftd --data-dir $D --listen 127.0.0.1:7499 --metrics-listen 127.0.0.1:9499 ${CONFIG:+--config $CONFIG} > $D/log 2>&1 &
P=$!
sleep 1.5
$B/giftctl --addr 127.0.0.1:7499 --json bulk issue --first 6035730000000000 --count 1000000 --amount 10.00 --currency USD --job inv --chunk $CH --window $W > /dev/null
sleep 20
LOAD="$B/giftload --addr 127.0.0.1:7499 --connections 8 --pipeline 16 --rate 4000 --duration-secs ${SECS:-15} --cards 10000 --json --latency-log $D/lat"
curl -s 127.0.0.1:9499/metrics > $D/m0
# Each thread's stat line of giftd, and giftload's process line: utime and stime in clock ticks.
cpu_snapshot() { cat /proc/$P/task/*/stat > $D/threads.$1; cat /proc/$(pgrep -n -x giftload)/stat > $D/load.$1; }
for _ in $(seq ${HOG:-0}); do timeout $((${SECS:-15} + 3)) yes > /dev/null & done
( sleep 2; [ -n "$NOBULK" ] && echo 0 > $D/act.time && echo '{}' > $D/act.json && exit; date +%s%3N > $D/act.start; cpu_snapshot a; curl -s 127.0.0.1:9499/metrics > $D/ma; /usr/bin/time -f "%e %U %S" -o $D/act.time $CTL_PREFIX $B/giftctl --addr 127.0.0.1:7499 --json bulk activate --first 6035730000000000 --count 1000000 --amount 5.00 --currency USD --job act --chunk $CH --window $W > $D/act.json; date +%s%3N > $D/act.end; cpu_snapshot b; curl -s 127.0.0.1:9499/metrics > $D/mb ) &
A=$!
$LOAD > $D/during.json 2>/dev/null
wait $A
curl -s 127.0.0.1:9499/metrics > $D/m1
python3 - <<PY
import json,os,re
d=json.load(open('$D/during.json'))
w=d['workloads'][0] if 'workloads' in d else d
print('whole', {k:v for k,v in w.items() if k.endswith('_us') or k=='ops_per_sec'})
lines=open('$D/lat').read().split('\n')
start_ms=int(lines[0].split()[-1])
samples=[tuple(map(int,l.split())) for l in lines[1:] if l]
if os.path.exists('$D/act.start'):
    lo=(int(open('$D/act.start').read())-start_ms)*1000; hi=(int(open('$D/act.end').read())-start_ms)*1000
    lat=sorted(l for t,l in samples if lo<=t<=hi)
    if lat:
        q=lambda p: lat[min(len(lat)-1,int(p*len(lat)))]
        print('job', {'redeems':len(lat),'p50_us':q(0.5),'p99_us':q(0.99),'p999_us':q(0.999),'max_us':lat[-1]})
act=open('$D/act.time').read().split()
print('activation secs', act[0])
def ticks(path):
    # (tid, name) -> utime + stime; the name is between the first '(' and the last ')'.
    r={}
    for l in open(path):
        tid,rest=l.split(' (',1); name,fields=rest.rsplit(') ',1); f=fields.split()
        r[(tid,name)]=int(f[11])+int(f[12])
    return r
if os.path.exists('$D/threads.b'):
    hz=os.sysconf('SC_CLK_TCK'); a=ticks('$D/threads.a'); b=ticks('$D/threads.b')
    by={}
    for k,v in b.items():
        name=re.sub(r'[0-9]+$','',k[1]); by[name]=by.get(name,0)+(v-a.get(k,0))/hz
    by['giftload']=(sum(ticks('$D/load.b').values())-sum(ticks('$D/load.a').values()))/hz
    by['giftctl']=float(act[1])+float(act[2])
    wall=(int(open('$D/act.end').read())-int(open('$D/act.start').read()))/1000
    print('job window, CPU: %.2f s of %.2f on 2 cores;' % (sum(by.values()),2*wall), ', '.join('%s %.2f' % kv for kv in sorted(by.items(), key=lambda kv: -kv[1]) if kv[1]>0))
def hist(path,name,labels):
    h={}
    for l in open(path):
        m=re.match(name+r'_bucket\{'+labels+r'le="([^"]+)"\} (\S+)',l)
        if m: h[m.group(1)]=float(m.group(2))
    return h
def p99(h):
    n=h.get('+Inf',0)
    return next((k for k,v in sorted(h.items(), key=lambda kv: float(kv[0])) if v>=0.99*n), None) if n else None
if os.path.exists('$D/mb'):
    # The server's own view of the job's window: from its request start to its reply write.
    for name,labels in [('giftd_request_duration_seconds','op="redeem",'),('giftd_commit_wait_seconds','stage="write",'),('giftd_commit_wait_seconds','stage="sync",'),('giftd_wal_write_seconds',''),('giftd_wal_fsync_seconds','')]:
        a=hist('$D/ma',name,labels); b=hist('$D/mb',name,labels)
        d={k:int(b[k]-a.get(k,0)) for k in b}
        print('job window, server:', name+'{'+labels+'}', 'p99 at most', p99(d), 's;', d)
        if name=='giftd_request_duration_seconds' and d.get('+Inf'):
            print('job window, server: redeems within 2 ms: %.2f%%' % (100*d.get('0.002',0)/d['+Inf']))
print('whole run:')
for name,labels in [('giftd_request_duration_seconds','op="redeem",'),('giftd_wal_fsync_seconds',''),('giftd_wal_write_seconds',''),('giftd_wal_group_size',''),('giftd_commit_wait_seconds','stage="write",'),('giftd_commit_wait_seconds','stage="sync",')]:
    a=hist('$D/m0',name,labels); b=hist('$D/m1',name,labels)
    print(name+'{'+labels+'}', {k:int(b[k]-a.get(k,0)) for k in b})
PY
kill $P; wait $P; cp $D/log ${LOG_COPY:-/dev/null}; rm -rf $D
