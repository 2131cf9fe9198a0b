"""How fast is this box: the appliance against raw llama-cpp-python, llama_cpp.server and llama-server.

Run through `scripts/bench` (which prepares the comparison servers). Prints a table with ratios and
writes the figures to bench-results/latest.json. Everything runs on this machine, on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.modelstore.catalog import catalog_manifests  # noqa: E402
from appliance.modelstore.store import ModelStore  # noqa: E402

MODEL_ID = "gemma3-270m"
STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. Ships passing the rocky "
    "coast relied on its beam to find their way home through fog and storms. One night, a strange vessel appeared "
    "on the horizon, its sails glowing faintly green under the moon. The keeper watched it drift closer, wondering "
    "where it had come from and who might be aboard. "
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    ttft: float
    itl: list[float]
    tokens: int
    ok: bool


@dataclass
class Level:
    clients: int
    wall_s: float
    tokens: int
    agg_tps: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    errors: int


@dataclass
class Report:
    machine: str
    threads: int
    single_stream: dict[str, float] = field(default_factory=dict)
    levels: dict[str, list[Level]] = field(default_factory=dict)
    prefix: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class ServerProc:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        log = open(REPO / "bench-results" / f"{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see bench-results/{self.name}.log")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200 and (self.name != "appliance" or httpx.get(f"{self.url}/health").status_code == 200):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start")

    def peak_rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def stream_one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None
) -> Request:
    """One streamed greedy completion; `extra` goes into the body too (e.g. llama-server's `lora`)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Request(float("nan"), [], 0, False)
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        stamps.append(time.perf_counter())
    except httpx.HTTPError:
        return Request(float("nan"), [], 0, False)
    if not stamps:
        return Request(float("nan"), [], 0, False)
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return Request(stamps[0] - start, itl, usage_tokens or len(stamps), True)


async def run_level(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> Level:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await stream_one(client, url, model, prompts[-1], 8)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, prompts[i], max_tokens) for i in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    ttft = [r.ttft for r in ok]
    return Level(
        clients=clients,
        wall_s=round(wall, 3),
        tokens=tokens,
        agg_tps=round(tokens / wall, 2),
        ttft_p50=round(pct(ttft, 0.5), 4),
        ttft_p99=round(pct(ttft, 0.99), 4),
        itl_p50=round(pct(itl, 0.5), 4),
        itl_p99=round(pct(itl, 0.99), 4),
        errors=len(results) - len(ok),
    )


def make_prompts(llm: object, n: int, tokens: int) -> list[str]:
    """n distinct prompts of `tokens` tokens each (distinct from their first token on)."""
    prompts = []
    for i in range(n):
        text = f"Story number {i + 1}. " + STORY * 20
        ids = llm.tokenize(text.encode(), add_bos=False)[: tokens - 1]  # type: ignore[attr-defined]
        prompts.append(llm.detokenize(ids).decode("utf-8", "ignore"))  # type: ignore[attr-defined]
    return prompts


def raw_single_stream(model_path: Path, prompt: str, max_tokens: int, threads: int) -> tuple[float, int]:
    """Decode tokens/s of llama-cpp-python's own Llama.create_completion, in-process."""
    import llama_cpp

    # flash attention as the appliance's default (models.flash_attn = "auto")
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          flash_attn=True, verbose=False)
    llm.create_completion(prompt, max_tokens=8, temperature=0)
    best = 0.0
    n = 0
    for _ in range(2):
        stamps = []
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        if rate > best:
            best, n = rate, len(stamps)
    del llm
    return best, n


async def api_single_stream(url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    best, n = 0.0, 0
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, MODEL_ID, prompt, 8)
        for _ in range(2):
            r = await stream_one(client, url, MODEL_ID, prompt, max_tokens)
            rate = len(r.itl) / sum(r.itl) if r.itl else 0.0
            if rate > best:
                best, n = rate, r.tokens
    return best, n


async def prefix_ttft(url: str, llm: object) -> dict[str, float]:
    """TTFT of a 1,000-token prompt whose first 900 tokens were sent before, vs a cold one."""
    def block(seed: str, n: int) -> str:
        ids = llm.tokenize((seed + " " + STORY * 40).encode(), add_bos=False)[:n]  # type: ignore[attr-defined]
        return llm.detokenize(ids).decode("utf-8", "ignore")  # type: ignore[attr-defined]

    shared = block("Manual section A.", 900)
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, MODEL_ID, shared + block("First question:", 100), 1)
        hits, colds = [], []
        for i in range(3):
            hit = await stream_one(client, url, MODEL_ID, shared + block(f"Question {i}:", 100), 1)
            cold = await stream_one(client, url, MODEL_ID, block(f"Unrelated manual {i}.", 1000), 1)
            hits.append(hit.ttft)
            colds.append(cold.ttft)
    h, c = statistics.median(hits), statistics.median(colds)
    return {"ttft_hit_s": round(h, 4), "ttft_cold_s": round(c, 4), "ratio": round(h / c, 3)}


def levels_with_restarts(
    name: str, start: Callable[[int], ServerProc], levels: list[int], prompts: list[str], max_tokens: int, report: Report
) -> list[Level]:
    """One fresh server per concurrency level, started with as many slots as clients."""
    results, peak = [], 0.0
    for n in levels:
        srv = start(n)
        try:
            srv.wait_ready()
            results.append(asyncio.run(run_level(srv.url, MODEL_ID, prompts, n, max_tokens)))
        finally:
            peak = max(peak, srv.peak_rss_mb())
            srv.stop()
        print(f"{name:<16} {n:>2} clients: {results[-1].agg_tps:7.1f} tok/s", flush=True)
    report.peak_rss_mb[name] = round(peak, 1)
    return results


def llama_server_proc(binary: Path, model_path: Path, slots: int, n_ctx: int, threads: int, *extra: str) -> ServerProc:
    """llama.cpp's llama-server on a free port with `slots` sequences of `n_ctx` tokens each."""
    port = free_port()
    cmd = [str(binary), "-m", str(model_path), "--port", str(port), "-np", str(slots), "-c", str(n_ctx * slots),
           "-t", str(threads), "-tb", str(threads), "--alias", MODEL_ID, "--no-webui", *extra]
    return ServerProc("llama_server", cmd, port)


def bench_models() -> tuple[Path, Path]:
    """The bundled models materialised in the test data directory; Gemma's GGUF, and a data directory of
    the benchmark's own that links them."""
    models_from = REPO / ".appliance-data" / "test"
    store = ModelStore(models_from / "models")
    for template in catalog_manifests():
        store.install(template)
    return models_from / "models" / MODEL_ID / "gemma-3-270m-q4_k_m.gguf", bench_data_dir(models_from)


def bench_data_dir(models_from: Path) -> Path:
    """A data directory of its own for the benchmarked servers (the models linked, nothing else), so a
    server or test already running on `models_from` does not hold its lock."""
    path = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    (path / "models").mkdir()
    for model in (models_from / "models").iterdir():
        if not model.name.startswith("."):
            (path / "models" / model.name).symlink_to(model)
    return path


def appliance_server(data_dir: Path, parallel: int, n_ctx: int, threads: int, speculative_draft: int = 0) -> ServerProc:
    """The appliance with speculation off unless asked: the comparison servers here decode one token per
    step, and the repeating story prompts would flatter prompt lookup (scripts/bench_spec.py measures it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    env = {"APPLIANCE_PARALLEL": str(parallel), "APPLIANCE_N_CTX": str(n_ctx), "APPLIANCE_THREADS": str(threads),
           "APPLIANCE_SPECULATIVE_DRAFT": str(speculative_draft), "APPLIANCE_SPECULATION": "all" if speculative_draft else "off"}
    return ServerProc("appliance", cmd, port, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (built from the vendored sources)")
    ap.add_argument("--llama-cpp-python", type=Path, help="python of a venv with llama-cpp-python[server]")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "latest.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    (REPO / "bench-results").mkdir(exist_ok=True)

    model_path, data_dir = bench_models()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    report = Report(machine=f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}", threads=args.threads)

    import llama_cpp

    tok = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, vocab_only=True, verbose=False)
    prompts = make_prompts(tok, max(levels) + 1, args.prompt_tokens)
    single_prompt = "Once upon a time, in a small village by the sea,"

    print(f"machine: {report.machine}; threads {args.threads}; model {MODEL_ID}", flush=True)
    raw_tps, raw_n = raw_single_stream(model_path, single_prompt, args.max_tokens, args.threads)
    print(f"raw Llama.create_completion single-stream decode: {raw_tps:.1f} tok/s ({raw_n} tokens)", flush=True)

    srv = appliance_server(data_dir, 1, 4096, args.threads)
    try:
        srv.wait_ready()
        api_tps, api_n = asyncio.run(api_single_stream(srv.url, single_prompt, args.max_tokens))
    finally:
        srv.stop()
    report.single_stream = {"raw_tps": round(raw_tps, 2), "api_tps": round(api_tps, 2), "ratio": round(api_tps / raw_tps, 3)}
    print(f"appliance HTTP single-stream decode: {api_tps:.1f} tok/s ({api_n} tokens) -> ratio {api_tps / raw_tps:.3f} (target >= 0.95)", flush=True)

    n_ctx = max(256, args.prompt_tokens + args.max_tokens + 64)
    runs: dict[str, list[Level]] = {}
    runs["appliance"] = levels_with_restarts(
        "appliance", lambda n: appliance_server(data_dir, n, n_ctx, args.threads), levels, prompts, args.max_tokens, report
    )
    if args.llama_cpp_python:
        runs["llama_cpp.server"] = []
        port = free_port()
        cmd = [str(args.llama_cpp_python), "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
               "--n_ctx", "4096", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--interrupt_requests", "False", "--model_alias", MODEL_ID]
        srv = ServerProc("llama_cpp_server", cmd, port)
        try:
            srv.wait_ready()
            for n in levels:
                runs["llama_cpp.server"].append(asyncio.run(run_level(srv.url, MODEL_ID, prompts, n, args.max_tokens)))
                print(f"{'llama_cpp.server':<16} {n:>2} clients: {runs['llama_cpp.server'][-1].agg_tps:7.1f} tok/s", flush=True)
        finally:
            report.peak_rss_mb["llama_cpp.server"] = round(srv.peak_rss_mb(), 1)
            srv.stop()

    if args.llama_server:

        def llama_server(n: int) -> ServerProc:
            return llama_server_proc(args.llama_server, model_path, n, n_ctx, args.threads)

        runs["llama-server"] = levels_with_restarts("llama-server", llama_server, levels, prompts, args.max_tokens, report)
    report.levels = runs

    srv = appliance_server(data_dir, 8, 2048, args.threads)
    try:
        srv.wait_ready()
        report.prefix = asyncio.run(prefix_ttft(srv.url, tok))
    finally:
        srv.stop()

    print("\naggregate generated tokens/s (streaming, %d-token prompts, %d-token outputs, greedy)" % (args.prompt_tokens, args.max_tokens))
    names = list(runs)
    print("clients " + "".join(f"{name:>18}" for name in names) + "".join(f"{'vs ' + name:>22}" for name in names[1:]))
    for i, n in enumerate(levels):
        ours = runs["appliance"][i].agg_tps
        row = f"{n:>7} " + "".join(f"{runs[name][i].agg_tps:>18.1f}" for name in names)
        row += "".join(f"{ours / runs[name][i].agg_tps:>21.2f}x" for name in names[1:])
        print(row)
    if 8 in levels:
        i = levels.index(8)
        lv = runs["appliance"][i]
        print(f"\nappliance at 8 clients: TTFT p50 {lv.ttft_p50 * 1000:.0f} ms, p99 {lv.ttft_p99 * 1000:.0f} ms; "
              f"inter-token p50 {lv.itl_p50 * 1000:.1f} ms, p99 {lv.itl_p99 * 1000:.1f} ms")
        for name, target in (("llama_cpp.server", 2.0), ("llama-server", 0.9)):
            if name in runs:
                print(f"ratio vs {name} at 8 clients: {lv.agg_tps / runs[name][i].agg_tps:.2f}x (target >= {target}x)")
    print(f"single-stream decode ratio HTTP/raw: {report.single_stream['ratio']:.3f} (target >= 0.95)")
    p = report.prefix
    print(f"prefix-hit TTFT {p['ttft_hit_s'] * 1000:.0f} ms vs cold {p['ttft_cold_s'] * 1000:.0f} ms: ratio {p['ratio']:.2f} (target <= 0.3)")
    print(f"peak RSS MB: {report.peak_rss_mb}")
    args.out.write_text(json.dumps(asdict(report), indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
