"""LoRA adapters, measured: aggregate tokens/s of 8 streaming clients over two adapters against 8 clients on
the base model, on the appliance and on llama.cpp's own llama-server (per-request `lora`), in one run.

    .venv/bin/python scripts/bench_adapters.py [--llama-server PATH] [--clients 8] [--max-tokens 128]

The two adapters are real LoRA GGUFs for Gemma 3 270M (rank 8 on every layer's attention query/value and
feed-forward up projections) written by tests/lora_gguf.py and imported with `appliance models import
--kind adapter`. Mixes, each with the clients started together on different prompts:
- base: every client on the base model;
- one adapter: every client on `gemma3-270m:tone`;
- two adapters: half on `tone`, half on `legal`;
- base + two: a third each (the base model's sequences are a decode group of their own too).
llama.cpp applies adapters per context, so each group costs a decode call of its own per step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import MODEL_ID, ServerProc, appliance_server, bench_models, llama_server_proc, stream_one  # noqa: E402
from bench_spec import OPENINGS  # noqa: E402

from tests.lora_gguf import write_lora  # noqa: E402

ADAPTERS = ("tone", "legal")


async def aggregate(url: str, models: list[str], extras: list[dict | None], max_tokens: int) -> float:
    """Generated tokens/s of len(models) clients streaming at once, client i on models[i] with extras[i]."""
    prompts = [OPENINGS[i % len(OPENINGS)] + f" (story {i})" for i in range(len(models))]
    # no-store: the same prompt in another mix must be generated again, not answered from the response cache
    headers = {"Cache-Control": "no-store"}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64), headers=headers) as client:
        await asyncio.gather(*(stream_one(client, url, m, "Hello", 4, e) for m, e in zip(models, extras)))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(
            stream_one(client, url, m, p, max_tokens, e) for m, p, e in zip(models, prompts, extras)
        ))
        wall = time.perf_counter() - start
    if not all(r.ok for r in results):
        raise RuntimeError(f"{sum(not r.ok for r in results)} requests failed on {url}")
    return sum(r.tokens for r in results) / wall


def mixes(clients: int) -> dict[str, list[str | None]]:
    """Which adapter each client uses (None: the base model)."""
    return {
        "base": [None] * clients,
        "one adapter": ["tone"] * clients,
        "two adapters": [ADAPTERS[i % 2] for i in range(clients)],
        "base + two": [(None, *ADAPTERS)[i % 3] for i in range(clients)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-server", type=Path, help="llama-server binary (scripts/bench builds it)")
    args = ap.parse_args()
    model_path, data_dir = bench_models()
    files = {name: write_lora(model_path, data_dir / f"{name}.gguf", seed=i + 1) for i, name in enumerate(ADAPTERS)}
    for name, path in files.items():
        subprocess.run([sys.executable, "-m", "appliance", "models", "import", str(path), "--kind", "adapter",
                        "--base", MODEL_ID, "--id", name, "--data-dir", str(data_dir)], check=True, capture_output=True)
    plan = mixes(args.clients)
    n_ctx = 512
    results: dict[str, dict[str, float]] = {}

    srv = appliance_server(data_dir, args.clients, n_ctx, args.threads)
    try:
        srv.wait_ready()
        results["appliance"] = {
            mix: asyncio.run(aggregate(srv.url, [f"{MODEL_ID}:{a}" if a else MODEL_ID for a in chosen],
                                       [None] * len(chosen), args.max_tokens))
            for mix, chosen in plan.items()
        }
    finally:
        srv.stop()
    if args.llama_server:
        lora = [arg for name in ADAPTERS for arg in ("--lora", str(files[name]))]
        srv = llama_server_proc(args.llama_server, model_path, args.clients, n_ctx, args.threads,
                                *lora, "--lora-init-without-apply")

        def body(adapter: str | None) -> dict:
            # llama-server's per-request adapters: every loaded adapter with its scale (0: off).
            return {"lora": [{"id": i, "scale": 1.0 if name == adapter else 0.0} for i, name in enumerate(ADAPTERS)]}

        try:
            srv.wait_ready()
            results["llama-server"] = {
                mix: asyncio.run(aggregate(srv.url, [MODEL_ID] * len(chosen), [body(a) for a in chosen], args.max_tokens))
                for mix, chosen in plan.items()
            }
        finally:
            srv.stop()

    print(f"\naggregate generated tokens/s, {args.clients} streaming clients, {args.max_tokens} tokens each, greedy")
    print(f"{'mix':<14}" + "".join(f"{name:>16}{'vs base':>9}" for name in results))
    for mix in plan:
        row = f"{mix:<14}"
        for name, rates in results.items():
            row += f"{rates[mix]:>16.1f}{rates[mix] / rates['base']:>8.2f}x"
        print(row)
    if "llama-server" in results:
        print("appliance / llama-server: " + ", ".join(
            f"{mix} {results['appliance'][mix] / results['llama-server'][mix]:.2f}x" for mix in plan))


if __name__ == "__main__":
    main()
