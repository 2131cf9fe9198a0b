"""Plain chat prompts against each chat model of a running appliance: answers, tokens, latency, tokens/s.

    .venv/bin/python scripts/chat_prompts.py --url http://127.0.0.1:8080 [--models smollm2-135m,gemma3-270m]

Greedy (temperature 0), one request at a time, `Cache-Control: no-cache` so every answer is computed.
A routed model id (settings [routing.<name>]) may be given too: each answer then shows its X-Route path.
A check passes when the answer contains one of the expected words (case-insensitive): a rough signal of
whether a model follows simple instructions, not a benchmark.
"""

from __future__ import annotations

import argparse
import time

import httpx

PROMPTS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France? Answer in one word.", ("paris",)),
    ("What is 12 plus 7? Reply with the number only.", ("19",)),
    ("Translate 'thank you' into Spanish.", ("gracias",)),
    ("Name the largest planet in the solar system.", ("jupiter",)),
    ("Write one sentence about the sea.", ("sea", "ocean", "wave")),
    ("Is water wet? Answer yes or no.", ("yes", "no")),
    ("List three primary colours, separated by commas.", ("red", "blue", "yellow")),
    ("Who wrote 'Romeo and Juliet'?", ("shakespeare",)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}", "Cache-Control": "no-cache"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        for model in args.models.split(","):
            passed, tokens, seconds = 0, 0, 0.0
            print(f"## {model}")
            for prompt, expected in PROMPTS:
                started = time.perf_counter()
                r = client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens, "temperature": 0,
                })
                elapsed = time.perf_counter() - started
                r.raise_for_status()
                body = r.json()
                answer = body["choices"][0]["message"]["content"].strip()
                ok = any(word in answer.lower() for word in expected)
                passed += ok
                tokens += body["usage"]["completion_tokens"]
                seconds += elapsed
                route = f" [{r.headers['x-route']}]" if "x-route" in r.headers else ""
                print(f"- {'ok  ' if ok else 'MISS'} {elapsed:5.2f} s {body['usage']['completion_tokens']:3d} tok  "
                      f"{prompt!r} -> {answer[:100]!r}{route}")
            print(f"{model}: {passed}/{len(PROMPTS)} checks, {tokens} tokens in {seconds:.1f} s "
                  f"({tokens / seconds:.1f} tokens/s including prompt processing), "
                  f"mean latency {seconds / len(PROMPTS):.2f} s\n")


if __name__ == "__main__":
    main()
