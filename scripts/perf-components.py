"""Sums a flat `perf report --sort comm,dso,sym --stdio` by component of the ingest path.

Reads the report on standard input; prints each component's share of all samples. The
component is decided by the symbol's crate or library (first match wins), so the table
reads as "where the time goes" without a call graph.
"""
import re
import sys

COMPONENTS = [
    ("kernel (syscalls, TCP on loopback, scheduling)", r"\[kernel|\[k\]"),
    ("SQLite (in-process database)", r"sqlite3|libsqlite"),
    ("PostgreSQL client (protocol, results)", r"tokio_postgres|postgres_protocol|diesel_async::pg|pq_sys"),
    ("Diesel (query building, row mapping)", r"diesel"),
    ("load generator (reqwest client, its hyper half)", r"reqwest|hyper_util::client|hyper::client|h2::client|ingest::"),
    ("HTTP server (hyper, axum, tower)", r"hyper|axum|tower|http::|httparse"),
    ("JSON (serde_json) and report parsing", r"serde|domain::heartbeat|itoa|ryu"),
    ("credential check (SHA-256, constant-time compare)", r"sha2|subtle|digest|credential|auth"),
    ("tokio runtime (tasks, channels, timers, blocking pool)", r"tokio|mio|parking_lot|crossbeam"),
    ("allocator (malloc, free, memcpy)", r"malloc|free|_int_|memcpy|memmove|memset|realloc|alloc::"),
    ("server code (ingest, store, cache)", r"server::"),
]

shares = {name: 0.0 for name, _ in COMPONENTS}
other = 0.0
others = {}
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, comm, dso, kind, sym = float(m[1]), m[2], m[3], m[4], m[5]
    text = f"{dso} [{kind}] {sym}"
    for name, pattern in COMPONENTS:
        if re.search(pattern, text):
            shares[name] += pct
            break
    else:
        other += pct
        others[sym] = others.get(sym, 0.0) + pct

print("| component | share of samples |")
print("|---|---|")
for name, pct in sorted(shares.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {pct:.1f} % |")
print(f"| other | {other:.1f} % |")
top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
if top:
    print("\nlargest unassigned symbols: " + ", ".join(f"{s} ({p:.1f} %)" for s, p in top))
