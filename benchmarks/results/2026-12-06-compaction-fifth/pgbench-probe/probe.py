import glob, json
start = float(open('/tmp/bench/pgblog/gc.start').read()); end = float(open('/tmp/bench/pgblog/gc.end').read())
lat = []
for f in glob.glob('/tmp/bench/pgblog/pgbench_log.*'):
    for line in open(f):
        p = line.split()
        # client_id transaction_no time script_no time_epoch time_us [schedule_lag]
        t = int(p[4]) + int(p[5]) / 1e6; us = int(p[2])
        lat.append((t - us / 1e6, us / 1000.0))
lat.sort()
def p99(xs):
    xs = sorted(xs); return xs[int(0.99 * (len(xs) - 1))] if xs else None
inside = [l for t, l in lat if start <= t <= end]
before = [l for t, l in lat if t < start]
print(f"gc {end-start:.2f}s; p99 alone {p99(before):.1f} ms; p99 during {p99(inside):.1f} ms; n={len(inside)}")
import sys
if len(sys.argv)>1: sys.exit()
phases = json.loads(open('/tmp/bench/pgblog/phases.json').read() or '{}')
print(phases)
for t, l in lat:
    if start - 1 <= t <= end + 1 and l > 15: print(f"  +{t-start:6.2f}s {l:7.1f} ms")
