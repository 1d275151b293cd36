"""A large fleet against one running server: creation rate, memory, reads, idle rounds and
stale detection.

Creates N VMs (one report each from new hostnames, 48 client threads), then measures the
server's RSS (from /proc) while creating, after, and while the API and the first page of the
fleet are read; the steady-state rate (every VM reports again, same client); the scheduler's
round time and the server's CPU while the fleet is idle;
and, once every VM has gone silent, how long after its deadline each VM was marked down
(from the stored status time: status_since - (last_seen + stale timeout)).

With MODE "burst" it measures instead what happens when every VM's spooled report arrives at
once after an outage: BURST_THREADS clients (more than the server's ingest queue holds, which
fleet-scale.sh shrinks so that a bounded generator can overfill it) each send their share of
the fleet with no pause; a 503 is retried after its Retry-After plus jitter, as the agents do.
It reports how many were shed, the server's RSS peak, how long until every report was stored,
and checks that every VM holds the burst's report.

Usage: fleet_scale.py URL PID FLEET_TOKEN ADMIN_TOKEN VMS STALE_MS [MODE]
"""
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.parse

url, pid, fleet, admin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
vms, stale_ms = int(sys.argv[5]), int(sys.argv[6])
mode = sys.argv[7] if len(sys.argv) > 7 else "scale"
BURST_THREADS = int(os.environ.get("BURST_THREADS", "256"))
target = urllib.parse.urlsplit(url)
THREADS = 48


def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def conn():
    return http.client.HTTPConnection(target.hostname, target.port, timeout=120)


def get(path, c=None):
    c = c or conn()
    start = time.monotonic()
    c.request("GET", path, headers={"Authorization": f"Bearer {admin}"})
    r = c.getresponse()
    body = r.read()
    return r.status, body, (time.monotonic() - start) * 1000, r.getheader("Link")


shed = [0]


def report(c, host, uptime=3600):
    body = json.dumps({
        "hostname": host, "os": "linux", "cpu_percent": 12.5,
        "ram_used_bytes": 1 << 30, "ram_total_bytes": 4 << 30,
        "disks": [{"mount": "/", "used_bytes": 10 << 30, "total_bytes": 40 << 30}],
        "uptime_seconds": uptime, "agent_version": "scale",
    })
    for _ in range(1000):
        c.request("POST", "/api/health/report", body,
                  {"Authorization": f"Bearer {fleet}", "Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status == 200:
            return True
        if r.status in (429, 503):
            shed[0] += 1
            wait = float(r.getheader("Retry-After") or "1")
            time.sleep(wait * random.uniform(1.0, 1.5))
            continue
        raise SystemExit(f"report for {host}: HTTP {r.status}")
    return False


peak = [rss_mb()]
done = threading.Event()


def sample_rss():
    while not done.wait(0.5):
        peak[0] = max(peak[0], rss_mb())


def create(worker, threads=THREADS, uptime=3600):
    c = conn()
    for i in range(worker, vms, threads):
        report(c, f"scale-{i:06d}", uptime)


def every_vm_reports(threads=THREADS, uptime=3600):
    """One report per VM from `threads` clients; (seconds taken, server CPU % of one core)."""
    start, start_cpu = time.monotonic(), cpu_s()
    workers = [threading.Thread(target=create, args=(w, threads, uptime)) for w in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    took = time.monotonic() - start
    return took, (cpu_s() - start_cpu) / took * 100


sampler = threading.Thread(target=sample_rss, daemon=True)
sampler.start()
created_s, created_cpu = every_vm_reports()
print(f"created {vms} VMs in {created_s:.1f} s ({vms / created_s:,.0f}/s, server CPU "
      f"{created_cpu:.0f} % of one core); RSS peak while creating {peak[0]:.0f} MB, after {rss_mb():.0f} MB")

def every_vm(check):
    """Pages through GET /api/vms and applies `check` to every VM of the run."""
    after, c = None, conn()
    while True:
        path = "/api/vms?limit=1000" + (f"&after={urllib.parse.quote(after)}" if after else "")
        status, body, _, link = get(path, c)
        page = json.loads(body)
        for vm in page:
            if vm["hostname"].startswith("scale-"):
                check(vm)
        if not link or not page:
            break
        last = page[-1]
        after = f"{last['hostname']},{last['id']}"


if mode == "burst":
    # Every VM's spooled report at once; the marker uptime tells the burst's report apart.
    shed[0], peak[0] = 0, rss_mb()
    burst_s, burst_cpu = every_vm_reports(BURST_THREADS, 7200)
    done.set()
    held = []
    every_vm(lambda vm: held.append(vm["uptime_seconds"] == 7200))
    print(f"burst: {vms} reports from {BURST_THREADS} clients at once, {shed[0]} shed with 503 "
          f"(retried after Retry-After plus jitter), all stored in {burst_s:.1f} s "
          f"({vms / burst_s:,.0f}/s, server CPU {burst_cpu:.0f} % of one core); RSS peak during "
          f"the burst {peak[0]:.0f} MB, after {rss_mb():.0f} MB; "
          f"{sum(held)} of {vms} VMs hold the burst's report")
    if sum(held) != vms or len(held) != vms:
        raise SystemExit("FAIL: a report answered 200 is not stored")
    sys.exit(0)

status, body, ms, _ = get("/api/status")
print(f"GET /api/status: HTTP {status}, {ms:.0f} ms")
status, body, ms, link = get("/api/vms?limit=500")
print(f"GET /api/vms?limit=500: HTTP {status}, {ms:.0f} ms, {len(body) / 1e3:.0f} kB")
status, body, ms, _ = get("/")
print(f"GET / (the fleet page): HTTP {status}, {ms:.0f} ms, {len(body) / 1e6:.2f} MB")
print(f"RSS after the reads {rss_mb():.0f} MB, peak so far {peak[0]:.0f} MB")

# Steady state: every VM, now known, reports again with the same client (what creating them
# is compared with); a 503 (queue full) is retried after its Retry-After, as agents do.
shed[0] = 0
steady_s, steady_cpu = every_vm_reports()
print(f"steady state: {vms} reports from known VMs in {steady_s:.1f} s ({vms / steady_s:,.0f}/s, "
      f"server CPU {steady_cpu:.0f} % of one core; "
      f"creating ran at {created_s and steady_s / created_s * 100:.0f} % of it), {shed[0]} shed with "
      f"503/429, RSS {rss_mb():.0f} MB")

# Idle: nothing reports (all VMs fresh until the stale timeout), rounds run every second.
before_cpu, before = cpu_s(), time.monotonic()
time.sleep(min(10.0, max(1.0, stale_ms / 1000 - steady_s - 5)))
idle_cpu = (cpu_s() - before_cpu) / (time.monotonic() - before) * 100
_, body, _, _ = get("/api/health")
jobs = json.loads(body).get("jobs", {})
print(f"idle: server CPU {idle_cpu:.1f} % of one core, last scheduler round "
      f"{jobs.get('scheduler_round_took_ms')} ms, RSS {rss_mb():.0f} MB")

# Silence: every VM must be marked down; lag = status_since - (last_seen + stale).
deadline = time.monotonic() + stale_ms / 1000 + 300
while True:
    _, body, _, _ = get("/api/status")
    counts = json.loads(body)["counts"]
    if counts["down"] >= vms:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"not all down: {counts}")
    time.sleep(0.5)
lags = []
every_vm(lambda vm: vm["status"] == "down" and lags.append(
    vm["status_since_ms"] - (vm["last_seen_ms"] + stale_ms)))
lags.sort()
p = lambda q: lags[min(len(lags) - 1, int(len(lags) * q))]
done.set()
print(f"down after the deadline, {len(lags)} VMs: median {statistics.median(lags):.0f} ms, "
      f"p99 {p(0.99):.0f} ms, max {lags[-1]:.0f} ms; RSS peak over the run {peak[0]:.0f} MB")
