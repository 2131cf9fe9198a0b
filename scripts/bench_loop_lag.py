"""How late the server's event loop runs while it streams to many clients with the guardrails on.

    .venv/bin/python scripts/bench_loop_lag.py [--clients 8] [--seconds 60]

The server samples its own loop (appliance_event_loop_lag_seconds in /metrics: a timer that should fire
every 20 ms, and by how much it fired late). This script starts the real server on the bundled Gemma,
gives a tenant every guardrail (PII masked in input and streamed output, injection checked), runs N
clients that stream chat completions back to back, and reads the histogram before and after: the lag
distribution of the loaded period alone. Anything that blocks the loop (tokenising, grammar compilation,
the injection classifier, fsync'd usage writes) shows here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import fresh_data_dir, start_server, stop_server  # noqa: E402

GUARDED = '{"pii_input": "mask", "pii_output": "mask", "injection": "block"}'
PROMPT = "Write to jane.doe@example.com about the harbour schedule, and list three tide times for the quay."


def cli(data: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--data-dir", str(data), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def buckets(url: str) -> dict[float, float]:
    """The lag histogram's cumulative bucket counts, by upper bound in seconds."""
    out: dict[float, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("appliance_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> tuple[float, int]:
    """The smallest bucket bound holding a share q of the samples taken between the two scrapes."""
    delta = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
    total = delta[float("inf")]
    for bound, count in delta.items():
        if count >= q * total:
            return bound, int(total)
    return float("inf"), int(total)


def load(url: str, key: str, clients: int, seconds: float) -> int:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            while time.monotonic() < stop:
                body = {"model": "gemma3", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 48,
                        "stream": True, "temperature": 0.7, "seed": i}
                with c.stream("POST", "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}) as r:
                    assert r.status_code == 200, r.read()
                    for _ in r.iter_lines():
                        pass
                done[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--guardrails", default=GUARDED, help="the tenant's guardrail policy (JSON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = fresh_data_dir(ROOT / ".appliance-data" / "test", Path(tmp) / "data")
        cli(data, "tenants", "create", "bench", "--rpm", "0", "--tpm", "0", "--guardrails", args.guardrails)
        key = cli(data, "keys", "create", "--tenant", "bench", "--rpm", "0", "--tpm", "0")
        server = start_server(data, Path(tmp) / "server.log")
        try:
            load(server.url, key, 1, 3)  # warm up
            idle_before = buckets(server.url)
            time.sleep(5)
            idle_after = buckets(server.url)
            before = buckets(server.url)
            requests = load(server.url, key, args.clients, args.seconds)
            after = buckets(server.url)
        finally:
            stop_server(server)
    p50, n = quantile(before, after, 0.50)
    p99, _ = quantile(before, after, 0.99)
    idle99, _ = quantile(idle_before, idle_after, 0.99)
    print(f"{args.clients} streaming clients, guardrails {args.guardrails}: {requests} requests in {args.seconds:.0f} s")
    print(f"event loop lag over {n} samples (20 ms timer): p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms"
          f" (histogram bucket bounds); idle p99 <= {idle99 * 1000:g} ms")
    print(f"target p99 <= 5 ms: {'met' if p99 <= 0.005 else 'NOT met'}")


if __name__ == "__main__":
    main()
