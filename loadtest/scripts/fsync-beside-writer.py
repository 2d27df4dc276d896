#!/usr/bin/env python3
"""usage: fsync-beside-writer.py — fdatasync latency of a 4 KiB write, alone and beside another
thread streaming a 32 MB file (as a RocksDB flush does), at full speed or held to a rate, with
sync_file_range every chunk. Each case runs 3 s in /tmp. The figures behind
durability.table_write_mib_per_sec."""
import ctypes, os, threading, time

libc = ctypes.CDLL("libc.so.6", use_errno=True)
SYNC_FILE_RANGE_WRITE = 2
DIR = os.environ.get("DIR", "/tmp")


def case(stream, chunk=1 << 20, mib_per_sec=0.0, secs=3.0):
    a, b = os.path.join(DIR, "fsync-a"), os.path.join(DIR, "fsync-b")
    fa = os.open(a, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fa, b"\0" * (8 << 20))
    os.fsync(fa)
    stop = False

    def streamer():
        data = b"x" * chunk
        while not stop:
            fb = os.open(b, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            off, t0 = 0, time.perf_counter()
            while not stop and off < (32 << 20):
                os.write(fb, data)
                libc.sync_file_range(fb, ctypes.c_longlong(off), ctypes.c_longlong(chunk), SYNC_FILE_RANGE_WRITE)
                off += chunk
                if mib_per_sec:
                    ahead = t0 + off / (mib_per_sec * (1 << 20)) - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
            os.fdatasync(fb)
            os.close(fb)

    th = threading.Thread(target=streamer) if stream else None
    if th:
        th.start()
    lat, i, end = [], 0, time.time() + secs
    while time.time() < end:
        os.pwrite(fa, b"y" * 4096, (i % 2000) * 4096)
        i += 1
        t = time.perf_counter()
        os.fdatasync(fa)
        lat.append(time.perf_counter() - t)
        time.sleep(0.0005)
    stop = True
    if th:
        th.join()
    os.close(fa)
    for p in (a, b):
        if os.path.exists(p):
            os.unlink(p)
    lat.sort()
    q = lambda p: lat[int(p * len(lat))] * 1e3
    what = "alone" if not stream else f"beside a writer, {chunk >> 10} KiB syncs, " + (
        f"{mib_per_sec:.0f} MiB/s" if mib_per_sec else "full speed")
    print(f"{what:48s} fsyncs={len(lat)} p50={q(.5):.2f} ms p99={q(.99):.2f} ms max={lat[-1] * 1e3:.2f} ms")


case(False)
case(True)
case(True, 1 << 20, 100)
case(True, 256 << 10, 100)
case(True, 1 << 20, 50)
