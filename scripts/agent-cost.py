"""CPU time (user + system) of one Linux agent report, run as the systemd timer runs it.

Each run is a fresh `linux-agent.sh --tick` against a running server, spaced so the CPU
sample window is as in production; rusage of finished children counts the agent and
everything it starts (curl, df, ...). Usage: agent_cost.py SERVER_URL TOKEN [RUNS]
"""
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

server, token = sys.argv[1], sys.argv[2]
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 20
agent = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "agents", "linux-agent.sh")
state = tempfile.mkdtemp()
env = dict(os.environ, VMHC_STATE_DIR=state, VMHC_AGENT_CONF=os.path.join(state, "none"),
           SERVER_URL=server, AGENT_TOKEN=token, INSECURE="true")
subprocess.run(["bash", agent, "--tick"], env=env, check=True)  # primes the CPU sample
samples = []
for _ in range(runs):
    time.sleep(0.7)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["bash", agent, "--tick"], env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    samples.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
left = subprocess.run(["pgrep", "-fc", agent], capture_output=True, text=True).stdout.strip() or "0"
print(f"agent CPU per report: median {statistics.median(samples):.1f} ms, "
      f"min {min(samples):.1f}, max {max(samples):.1f} ({runs} runs); processes left: {left}")
