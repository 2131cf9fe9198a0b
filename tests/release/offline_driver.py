"""Run inside a network namespace that has only loopback: install the release, start it, use it.

    unshare -n python offline_driver.py RELEASE_DIR BASE_DIR PORT

Prints one JSON object with what it saw; the test asserts on it. Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI


def main() -> None:
    release, base, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    out: dict[str, object] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    started = time.monotonic()
    install = subprocess.run(
        [str(release / "install.sh"), "--prefix", str(base / "opt"), "--data-dir", str(base / "data"),
         "--etc-dir", str(base / "etc"), "--no-systemd", "--port", str(port)],
        capture_output=True, text=True,
    )
    out["install_s"] = round(time.monotonic() - started, 1)
    out["install_rc"], out["install_out"] = install.returncode, install.stdout + install.stderr
    if install.returncode != 0:
        print(json.dumps(out))
        return
    # The installer prints the foreground command where systemd does not run: use exactly that.
    lines = install.stdout.splitlines()
    command = lines[lines.index("install: start the server in the foreground with:") + 1].strip()
    out["command"] = command
    log = (base / "server.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        out["healthy_s"] = round(time.monotonic() - started, 2)
        out["health"] = httpx.get(f"{url}/health", timeout=5).json()
        client = OpenAI(base_url=f"{url}/v1", api_key="offline", max_retries=0, timeout=120)
        done = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        out["completion"] = done.choices[0].text
        emb = client.embeddings.create(model="all-minilm-l6-v2", input=["pumps need oil"])
        out["embedding_dims"] = len(emb.data[0].embedding)
        httpx.post(f"{url}/v1/collections", json={"name": "manuals"}, timeout=30).raise_for_status()
        files = {"files": ("pump.md", b"# Pump\n\nThe P-100 pump needs ISO VG 46 oil every 500 hours.\n")}
        ingest = httpx.post(f"{url}/v1/collections/manuals/documents", files=files, timeout=120)
        out["ingest"] = ingest.json()
        for mode in ("bm25", "vector"):
            hits = httpx.post(f"{url}/v1/collections/manuals/search",
                              json={"query": "which oil for the pump", "mode": mode, "top_k": 1}, timeout=60).json()
            out[f"search_{mode}"] = hits
        out["owner"] = subprocess.run(["stat", "-c", "%U", str(base / "data" / "gateway.db")],
                                      capture_output=True, text=True).stdout.strip()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        out["server_log_tail"] = (base / "server.log").read_text(errors="replace")[-3000:]
        # on a failure the test shows stderr: what the server said is what explains it
        print(f"server exit code {proc.returncode}; log tail:\n{out['server_log_tail']}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
