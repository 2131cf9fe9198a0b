"""Draftless speculative decoding, measured: the appliance with and without it, and llama.cpp's own
llama-server with and without its n-gram speculation, on the same prompts in one run.

    .venv/bin/python scripts/bench_spec.py --llama-server PATH [--max-tokens 128] [--prompts 4]

(`scripts/bench` builds llama-server from the llama.cpp vendored in llama-cpp-python's sdist; its path is
.bench/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server.)

Two kinds of prompt, each streamed greedily one at a time (decode tokens/s = tokens after the first
over the time after the first):
- grounded: XQuAD paragraphs as numbered sources, a question, "Answer:" (the shape of a document Q&A
  prompt to a base model: answers copy their sources);
- open-ended: story openings with nothing to copy.
Then 8 clients at once on the open-ended prompts, aggregate tokens/s with speculation on and off (it
stands aside while more than `models.speculative_max_active` sequences generate).

Last, prefixes shared across slots: 8 clients at once, each a 1,000-token manual (the same for all) plus
its own question, 16 tokens each; time to first token p50 of the appliance and of llama-server -np 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import (  # noqa: E402
    MODEL_ID, ServerProc, appliance_server, bench_models, llama_server_proc, run_level, stream_one,
)


XQUAD = REPO.parent / "shared" / "data" / "xquad" / "xquad.en.json"
OPENINGS = [
    "Once upon a time, in a small village by the sea,",
    "The engineer opened the control room door and saw",
    "In the spring of that year the river rose higher than anyone remembered, and",
    "She had never trusted the old map, but tonight",
    "The committee met on a grey Tuesday morning to decide",
    "Deep in the forest, where the paths ran out,",
    "When the last train left the station,",
    "The recipe had been in the family for generations:",
]


def grounded_prompts(n: int) -> list[str]:
    data = json.loads(XQUAD.read_text())["data"]
    prompts = []
    for article in data[: n]:
        paras = article["paragraphs"][:2]
        sources = "\n".join(f"[{i + 1}] {p['context']}" for i, p in enumerate(paras))
        question = paras[0]["qas"][0]["question"]
        prompts.append(f"Sources:\n{sources}\n\nQuestion: {question}\nAnswer (quote the sources, cite [n]):")
    return prompts


async def decode_rate(url: str, prompts: list[str], max_tokens: int) -> float:
    """Median over the prompts of decode tokens/s, each prompt streamed alone after a warm-up."""
    rates = []
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, MODEL_ID, prompts[0], 4)
        for prompt in prompts:
            r = await stream_one(client, url, MODEL_ID, prompt, max_tokens)
            if r.ok and r.itl:
                # chunks can carry several tokens when guesses are accepted: count tokens, not chunks
                rates.append((r.tokens - 1) / sum(r.itl))
    return statistics.median(rates) if rates else float("nan")


def measure(name: str, srv: ServerProc, sets: dict[str, list[str]], max_tokens: int) -> dict[str, float]:
    try:
        srv.wait_ready()
        out = {kind: round(asyncio.run(decode_rate(srv.url, prompts, max_tokens)), 2) for kind, prompts in sets.items()}
    finally:
        srv.stop()
    print(f"{name:<28} " + "  ".join(f"{k} {v:6.1f} tok/s" for k, v in out.items()), flush=True)
    return out


def shared_prefix_ttft(args: argparse.Namespace, data_dir: Path, model_path: Path) -> dict[str, float]:
    """TTFT p50 of 8 simultaneous prompts that share a 1,000-token manual (16 tokens generated each)."""
    import llama_cpp

    tok = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, vocab_only=True, verbose=False)
    text = " ".join(f"Section {i}: the north lock opens at {6 + i % 3} and vessels over {80 + i} metres need a pilot."
                    for i in range(200))
    manual = tok.detokenize(tok.tokenize(text.encode(), add_bos=False)[:1000]).decode("utf-8", "ignore")
    prompts = [f"{manual}\nQuestion {i}: {OPENINGS[i]}\nAnswer:" for i in range(8)]

    async def ttft(url: str) -> float:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=16)) as client:
            await stream_one(client, url, MODEL_ID, "Hello", 2)
            results = await asyncio.gather(*(stream_one(client, url, MODEL_ID, p, 16) for p in prompts))
        return statistics.median(r.ttft for r in results if r.ok)

    out = {}
    srv = appliance_server(data_dir, 8, 2048, args.threads, 0)
    try:
        srv.wait_ready()
        out["appliance"] = round(asyncio.run(ttft(srv.url)), 4)
    finally:
        srv.stop()
    if args.llama_server:
        srv = llama_server_proc(args.llama_server, model_path, 8, 2048, args.threads)
        try:
            srv.wait_ready()
            out["llama-server"] = round(asyncio.run(ttft(srv.url)), 4)
        finally:
            srv.stop()
    print(f"shared prefix, 8 clients, TTFT p50: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", type=Path)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", type=int, default=8, help="models.speculative_draft for the 'on' runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "speculation.json")
    args = ap.parse_args()
    (REPO / "bench-results").mkdir(exist_ok=True)
    model_path, data_dir = bench_models()
    sets = {"grounded": grounded_prompts(args.prompts), "open-ended": OPENINGS[: args.prompts]}
    n_ctx = 2048

    results: dict[str, dict[str, float]] = {}
    results["appliance"] = measure("appliance", appliance_server(data_dir, 1, n_ctx, args.threads, 0), sets, args.max_tokens)
    results["appliance+spec"] = measure(
        "appliance + speculation", appliance_server(data_dir, 1, n_ctx, args.threads, args.draft), sets, args.max_tokens
    )
    if args.llama_server:
        def llama_server(extra: list[str]) -> ServerProc:
            return llama_server_proc(args.llama_server, model_path, 1, n_ctx, args.threads, *extra)

        results["llama-server"] = measure("llama-server", llama_server([]), sets, args.max_tokens)
        results["llama-server+spec"] = measure(
            "llama-server --spec-type ngram-simple", llama_server(["--spec-type", "ngram-simple"]), sets, args.max_tokens
        )

    aggregate = {}
    for label, draft in (("off", 0), ("on", args.draft)):
        srv = appliance_server(data_dir, 8, 512, args.threads, draft)
        try:
            srv.wait_ready()
            level = asyncio.run(run_level(srv.url, MODEL_ID, OPENINGS * 2, 8, args.max_tokens))
        finally:
            srv.stop()
        aggregate[label] = level.agg_tps
        print(f"appliance, 8 clients, speculation {label}: {level.agg_tps:.1f} tok/s", flush=True)

    shared = shared_prefix_ttft(args, data_dir, model_path)

    print("\nspeedup from speculation (decode tokens/s, on / off):")
    for kind in sets:
        line = f"  {kind:<11} appliance {results['appliance+spec'][kind] / results['appliance'][kind]:.2f}x (target"
        line += " >= 1.5x)" if kind == "grounded" else " >= 0.97x)"
        if "llama-server" in results:
            line += f"; llama-server {results['llama-server+spec'][kind] / results['llama-server'][kind]:.2f}x"
            line += f"; appliance+spec / llama-server+spec {results['appliance+spec'][kind] / results['llama-server+spec'][kind]:.2f}x"
        print(line)
    print(f"  8 clients  appliance {aggregate['on'] / aggregate['off']:.2f}x (target >= 1.0x, no loss)")
    if "llama-server" in shared:
        print(f"shared 1,000-token prefix, 8 clients: TTFT p50 appliance {shared['appliance'] * 1000:.0f} ms, "
              f"llama-server -np 8 {shared['llama-server'] * 1000:.0f} ms: "
              f"ratio {shared['appliance'] / shared['llama-server']:.2f} (target <= 0.5)")
    args.out.write_text(json.dumps({"single_stream": results, "eight_clients": aggregate, "shared_prefix_ttft_p50_s": shared},
                                   indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
