"""Tokens/s of the bundled model on one node against the same model split over 2 and 3 RPC workers.

Everything runs on this machine: the workers are `appliance peer serve` processes on loopback, so
they share this machine's cores with the head, and no network latency is added. Two views:

- raw llama.cpp: one greedy stream decoded by llama.cpp directly, in a fresh process per setup, on
  this node alone (with llama.cpp's repacked CPU weight layout, as the appliance loads models, and
  with the plain layout that RPC workers use) and over the workers: the cost of the RPC transport;
- appliance: the appliance's own engines, the local continuous-batching engine against the split
  model's engine (which adds the child process and its pipe), with 1 and 4 concurrent streams.

    .venv/bin/python scripts/bench_rpc.py [--threads 2] [--tokens 128] [--workers 2 3]

Each setup runs `--repeat` times, the setups taking turns, and the fastest run counts (this machine is
shared). Prints tables with ratios to the single node and writes bench-results/rpc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.engines import rpc  # noqa: E402
from appliance.types import Chunk, GenerationRequest, SamplingParams  # noqa: E402

MODEL = REPO / ".appliance-data" / "test" / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. Ships passing the rocky "
    "coast relied on its beam to find their way home through fog and storms. One night, a strange vessel appeared "
    "on the horizon, its sails glowing faintly green under the moon. The keeper watched it drift closer, wondering "
    "where it had come from and who might be aboard. "
)

_RAW = """
import ctypes, json, sys, time
import llama_cpp
from appliance.engines import rpc
path, prompt, n, threads, repack, peers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", json.loads(sys.argv[6])
mp = llama_cpp.llama_model_default_params()
mp.use_extra_bufts = repack
if peers:
    devices = rpc.register_peers(peers, timeout=5)
    handles = (ctypes.c_void_p * (len(devices) + 1))(*(d.handle for d in devices), None)
    mp.devices = ctypes.cast(handles, ctypes.c_void_p)
    mp.n_gpu_layers = 999
else:
    mp.n_gpu_layers = 0
model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch, cp.flash_attn_type = 2048, 512, threads, threads, 0
ctx = llama_cpp.llama_init_from_model(model, cp)
vocab = llama_cpp.llama_model_get_vocab(model)
data = prompt.encode()
buf = (llama_cpp.llama_token * 1024)()
k = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 1024, True, True)
sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
tokens = (llama_cpp.llama_token * k)(*buf[:k])
t0 = time.perf_counter()
assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, k)) == 0
token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
t1 = time.perf_counter()
for _ in range(n - 1):
    one = (llama_cpp.llama_token * 1)(token)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
t2 = time.perf_counter()
print(json.dumps({"prompt_tokens": k, "prompt_tps": k / (t1 - t0), "gen_tps": (n - 1) / (t2 - t1)}))
"""


class Workers:
    """`appliance peer serve` processes on loopback ports."""

    def __init__(self, count: int, threads: int, first_port: int) -> None:
        self.endpoints = [f"127.0.0.1:{first_port + i}" for i in range(count)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "appliance", "peer", "serve", "--bind", e, "--threads", str(threads)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
            for e in self.endpoints
        ]
        deadline = time.monotonic() + 60
        for endpoint in self.endpoints:
            while True:
                try:
                    rpc.probe(endpoint, 2)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(10)


def raw(prompt: str, tokens: int, threads: int, repack: bool, peers: list[str], repeat: int) -> dict[str, float]:
    """Best of `repeat` runs in fresh processes (the fastest is the least disturbed by other work)."""
    cmd = [sys.executable, "-c", _RAW, str(MODEL), prompt, str(tokens), str(threads), "1" if repack else "0", json.dumps(peers)]
    runs = []
    for _ in range(repeat):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return max(runs, key=lambda r: r["gen_tps"])


def _round(engine: Any, prompt: str, tokens: int, streams: int) -> dict[str, float]:
    """`streams` concurrent greedy generations of `tokens` tokens: aggregate generated tokens/s."""
    done = threading.Event()
    first: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()

    def emit_for(i: int) -> Any:
        seen = [False]

        def emit(item: Chunk | Exception) -> None:
            if not seen[0]:
                seen[0] = True
                first.append(time.perf_counter() - start)
            if isinstance(item, Exception):
                counts.append(0)
                print("error:", item, file=sys.stderr)
            elif item.finish_reason is not None:
                counts.append(item.usage.completion_tokens if item.usage else 0)
            else:
                return
            if len(counts) == streams:  # emit runs on the engine's thread: never block it
                done.set()

        return emit

    for i in range(streams):
        # A different prompt per stream and round: no prefix-cache hits.
        request = GenerationRequest(
            prompt=f"{time.time_ns()} {i}. {prompt}", max_tokens=tokens, sampling=SamplingParams(temperature=0), stop=()
        )
        engine.submit(request, emit_for(i), threading.Event())
    done.wait(600)
    wall = time.perf_counter() - start
    return {"streams": streams, "tokens": sum(counts), "wall_s": wall, "agg_tps": sum(counts) / wall, "ttft_s": max(first)}


def local_engine(threads: int, parallel: int) -> Any:
    from appliance.engines.llama import LlamaBatchContext
    from appliance.engines.scheduler import BatchScheduler

    ctx = LlamaBatchContext(
        MODEL, model_id="local", n_ctx_per_seq=1024, n_seq_max=parallel, n_batch=512, n_threads=threads, gpu_layers=0
    )
    return BatchScheduler(ctx, model_id="local", max_queue=16, queue_timeout_s=600, request_timeout_s=600)


def split_engine(peers: list[str], threads: int, parallel: int) -> Any:
    from appliance.engines.factory import BatchSpec
    from appliance.engines.llama import LlamaTokenizer
    from appliance.engines.split import SplitChatEngine, SplitSpec

    batch = BatchSpec(
        model_id="split", model_path=MODEL, n_ctx_per_seq=1024, n_seq_max=parallel, n_batch=512, n_threads=threads,
        gpu_layers=-1, max_queue=16, prefix_min_tokens=32, queue_timeout_s=600, request_timeout_s=600,
    )
    spec = SplitSpec(
        batch=batch, peers=tuple(peers), tensor_split=None, use_local_gpus=False, connect_timeout_s=5,
        stall_timeout_s=120, load_timeout_s=300, log_level=30,
    )
    engine = SplitChatEngine(spec, LlamaTokenizer(MODEL))
    if engine.failure:
        raise RuntimeError(engine.failure)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of the single node, of the head and of each worker")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--port", type=int, default=50152, help="first worker port")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setup; the fastest counts")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    prompt = STORY * 1  # about 80 tokens
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, {os.cpu_count()} logical CPUs",
        "threads": args.threads,
        "tokens": args.tokens,
        "load_average_before": os.getloadavg(),
        "raw": {},
        "appliance": {},
    }
    # One worker set per split setup (a worker serves one head at a time), all started up front, and
    # the setups measured in turn, round after round: drift in the machine's load hits them all alike.
    pools: dict[int, Workers] = {}
    port = args.port
    try:
        for n in args.workers:
            pools[n] = Workers(n, args.threads, port)
            port += n
        raw_setups: list[tuple[str, bool, list[str]]] = [
            ("raw: single node (repacked CPU layout)", True, []),
            ("raw: single node (plain CPU layout)", False, []),
            *((f"raw: split over {n} loopback workers", False, pools[n].endpoints) for n in args.workers),
        ]
        raw_runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in raw_setups}
        for _ in range(args.repeat):
            for name, repack, peers in raw_setups:
                raw_runs[name].append(raw(prompt, args.tokens, args.threads, repack, peers, 1))
        base = max(raw_runs[raw_setups[0][0]], key=lambda r: r["gen_tps"])
        print(f"\n{'setup (best of %d)' % args.repeat:<44} {'prompt t/s':>10} {'gen t/s':>8} {'gen vs single':>14}")
        for name, runs in raw_runs.items():
            r = max(runs, key=lambda r: r["gen_tps"])
            results["raw"][name] = {**r, "runs": runs}
            print(f"{name:<44} {r['prompt_tps']:>10.1f} {r['gen_tps']:>8.1f} {r['gen_tps'] / base['gen_tps']:>13.2f}x")

        engines = {"appliance: single node": local_engine(args.threads, 4)}
        for n in args.workers:
            engines[f"appliance: split over {n} workers"] = split_engine(pools[n].endpoints, args.threads, 4)
        app_runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        try:
            for _ in range(args.repeat):
                for streams in (1, 4):
                    for name, engine in engines.items():
                        app_runs.setdefault((name, streams), []).append(_round(engine, prompt, args.tokens, streams))
        finally:
            for engine in engines.values():
                engine.close()
    finally:
        for pool in pools.values():
            pool.stop()
    print(f"\n{'setup (best of %d)' % args.repeat:<44} {'agg gen t/s':>11} {'TTFT s':>7} {'vs single':>10}")
    for (name, streams), runs in sorted(app_runs.items(), key=lambda kv: kv[0][1]):
        r = max(runs, key=lambda r: r["agg_tps"])
        single = max(app_runs[("appliance: single node", streams)], key=lambda r: r["agg_tps"])
        results["appliance"][f"{name}, {streams} stream(s)"] = {**r, "runs": runs}
        print(f"{name + f', {streams} stream(s)':<44} {r['agg_tps']:>11.1f} {r['ttft_s']:>7.2f} {r['agg_tps'] / single['agg_tps']:>9.2f}x")
    results["load_average_after"] = os.getloadavg()
    out = REPO / "bench-results" / "rpc.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
