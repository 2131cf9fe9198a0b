"""What the gateway costs per request: the real server, a real key, a durable usage record per request.

    .venv/bin/python scripts/bench_gateway.py [--requests 300]

Compares GET /health (public: no key check, no usage record) with GET /v1/models and a 1-input
/v1/embeddings call made with an API key (key lookup, rate limiter, one fsync'd SQLite commit of the
hash-chained usage record), with and without input guardrails, sequentially; prints p50/p99 and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import fresh_data_dir, start_server, stop_server  # noqa: E402


def cli(data: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--data-dir", str(data), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def timed(client: httpx.Client, n: int, method: str, path: str, **kw: object) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        r = client.request(method, path, **kw)  # type: ignore[arg-type]
        out.append((time.perf_counter() - started) * 1000)
        assert r.status_code in (200, 503), r.text
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = fresh_data_dir(ROOT / ".appliance-data" / "test", Path(tmp) / "data")
        cli(data, "tenants", "create", "bench", "--rpm", "0")
        key = cli(data, "keys", "create", "--tenant", "bench", "--rpm", "0")
        cli(data, "tenants", "create", "noguard", "--guardrails", '{"pii_input": "allow", "injection": "allow"}')
        noguard = cli(data, "keys", "create", "--tenant", "noguard", "--rpm", "0")
        server = start_server(data, Path(tmp) / "server.log")
        try:
            client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            plain = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {noguard}"}, timeout=60)
            timed(client, 20, "GET", "/v1/models")  # warm up
            embed = {"model": "all-minilm-l6-v2", "input": "Contact me at jane@example.com tomorrow."}
            rows = {
                "GET /health (public, unmetered)": timed(client, args.requests, "GET", "/health"),
                "GET /v1/models (key + usage record)": timed(client, args.requests, "GET", "/v1/models"),
                "POST /v1/embeddings, 1 input (key + usage)": timed(
                    plain, args.requests, "POST", "/v1/embeddings", json=embed
                ),
                "POST /v1/embeddings, 1 input (key + guardrails + usage)": timed(
                    client, args.requests, "POST", "/v1/embeddings", json=embed
                ),
            }
        finally:
            stop_server(server)
    base = statistics.median(rows["GET /health (public, unmetered)"])
    print(f"{'route':<58} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs /health':>15}")
    for name, values in rows.items():
        print(f"{name:<58} {pct(values, 0.5):>8.2f} {pct(values, 0.99):>8.2f} {statistics.median(values) / base:>15.2f}")


if __name__ == "__main__":
    main()
