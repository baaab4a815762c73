"""Reward throughput: math-verify with its process pool vs serially, and an LLM judge against a real llama-server.

Part A, math-verify: one fixed set of answers (boxed integers, fractions, decimals, radicals and a few wrong ones,
against plain references) scored by :class:`~treeward.rewards.MathVerify` serially in this process (``workers=0``,
the SIGALRM deadline on the main thread) and through its pool of worker processes (``workers=2``, a real
per-sample deadline). Both get a warm-up call first (imports; for the pool also the worker start-up, reported
separately), then ``--repeats`` timed calls, interleaved; the best is reported as samples/s. The scores of the two
paths must agree (checked).

Part B, LLM judge: :class:`~treeward.rewards.judge.PointwiseJudge` against llama.cpp's native ``llama-server``
serving the shipped tiny policy on loopback (built by ``scripts/llama_server.sh``; skipped with a message if it is
not built). The template is the arithmetic question and the verdict is the model's ``Answer: N``, so every request
is a real ~20-token greedy generation. Measured:

* cold vs warm cache: a fresh SQLite cache, then the same batch again (every request a hit, no HTTP);
* concurrency 1 vs 8 (no cache): the server runs 16 slots with continuous batching on one thread.

Prints the ratios and writes ``benchmarks/out/rewards.json``. The machine is shared: numbers are best-of-repeats.

    python benchmarks/rewards.py [--n-math 200] [--n-judge 64] [--repeats 3] [--out benchmarks/out/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from treeward.rewards.base import RewardResult, Sample
from treeward.rewards.judge import Decoding, JudgeClient, LlamaServer, PointwiseJudge, find_llama_server
from treeward.rewards.verifiable import MathVerify
from treeward.tasks.arithmetic import generate_problems


def math_set(n: int, seed: int = 0) -> list[Sample]:
    """``n`` answer/reference pairs in the forms math-verify normalises (about 1 in 5 wrong)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 12)
        kind = i % 5
        if kind == 0:
            resp, ref = f"The answer is $\\boxed{{{a * b}}}$.", str(a * b)
        elif kind == 1:
            resp, ref = f"So we get $\\boxed{{\\frac{{{a}}}{{{b}}}}}$", f"{a}/{b}"
        elif kind == 2:
            resp, ref = f"$\\boxed{{{a / 4}}}$", f"\\frac{{{a}}}{{4}}"
        elif kind == 3:
            resp, ref = f"$\\boxed{{{a}\\sqrt{{{b}}}}}$", f"\\sqrt{{{a * a * b}}}"
        else:
            resp, ref = f"$\\boxed{{{a + 1}}}$", str(a)  # wrong
        out.append(Sample(prompt="", response=resp, reference=ref))
    return out


def bench_math(n: int, repeats: int) -> dict[str, Any]:
    samples = math_set(n)
    serial = MathVerify(workers=0)
    pool = MathVerify(workers=2)
    serial(samples[:5])  # imports sympy / latex2sympy in this process
    t0 = time.perf_counter()
    pool(samples[:5])  # spawns and warms the workers
    startup = time.perf_counter() - t0
    s_scores = [r.score for r in serial(samples)]
    p_scores = [r.score for r in pool(samples)]
    assert s_scores == p_scores, "pool and serial disagree"
    s_best = p_best = float("inf")
    for _ in range(repeats):  # interleaved, so drift in machine load hits both
        t0 = time.perf_counter()
        serial(samples)
        s_best = min(s_best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool(samples)
        p_best = min(p_best, time.perf_counter() - t0)
    pool.close()
    correct = sum(1 for x in s_scores if x == 1.0)
    return {
        "n": n,
        "correct": correct,
        "serial_samples_per_s": n / s_best,
        "pool_samples_per_s": n / p_best,
        "pool_workers": 2,
        "pool_startup_s": startup,
        "pool_over_serial": s_best / p_best,
    }


def bench_judge(n: int, repeats: int) -> dict[str, Any]:
    build = find_llama_server()
    if build is None:
        return {"skipped": "llama-server is not built: run scripts/llama_server.sh"}
    prompts = [p.prompt for p in generate_problems(n, [1, 2, 3], seed=11)]
    samples = [Sample(prompt=p, response="") for p in prompts]
    decoding = Decoding(max_tokens=48)
    out: dict[str, Any] = {"n": n, "llama_cpp_commit": build.commit}
    with LlamaServer(build, slots=16) as srv, tempfile.TemporaryDirectory() as tmp:

        def judge(client: JudgeClient) -> PointwiseJudge:
            return PointwiseJudge(
                client,
                template="{prompt}",
                pattern=r"Answer: (?P<score>\d+)",
                score_range=None,
                decoding=decoding,
            )

        # warm the server (first requests allocate its buffers)
        judge(JudgeClient(srv.base_url, model="tiny"))(samples[:8])

        # cold vs warm cache (concurrency 8): a fresh cache file per repeat for the cold run
        cold_best = warm_best = float("inf")
        warm_http = -1
        parsed = 0
        for k in range(repeats):
            client = JudgeClient(
                srv.base_url, model="tiny", max_concurrency=8, cache_path=Path(tmp) / f"c{k}.db"
            )
            j = judge(client)
            t0 = time.perf_counter()
            res: list[RewardResult] = j(samples)
            cold_best = min(cold_best, time.perf_counter() - t0)
            parsed = sum(r.score is not None for r in res)
            before = client.stats.http_requests
            t0 = time.perf_counter()
            j(samples)
            warm_best = min(warm_best, time.perf_counter() - t0)
            warm_http = client.stats.http_requests - before
        out["cache"] = {
            "cold_samples_per_s": n / cold_best,
            "warm_samples_per_s": n / warm_best,
            "warm_over_cold": cold_best / warm_best,
            "warm_http_requests": warm_http,
            "parsed_verdicts": parsed,
        }

        # concurrency 1 vs 8, no cache
        best = {1: float("inf"), 8: float("inf")}
        for _ in range(repeats):  # interleaved, so drift in machine load hits both
            for conc in (1, 8):
                j = judge(JudgeClient(srv.base_url, model="tiny", max_concurrency=conc))
                t0 = time.perf_counter()
                j(samples)
                best[conc] = min(best[conc], time.perf_counter() - t0)
        rates = {conc: n / t for conc, t in best.items()}
        out["concurrency"] = {
            "c1_samples_per_s": rates[1],
            "c8_samples_per_s": rates[8],
            "c8_over_c1": rates[8] / rates[1],
            "server": "llama-server -t 1 -np 16 (continuous batching)",
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n-math", type=int, default=200)
    parser.add_argument("--n-judge", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/rewards.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    math = bench_math(args.n_math, args.repeats)
    print(
        f"math-verify, {math['n']} samples ({math['correct']} correct): serial {math['serial_samples_per_s']:.1f}/s, "
        f"pool(2) {math['pool_samples_per_s']:.1f}/s → pool/serial {math['pool_over_serial']:.2f}× "
        f"(pool start-up {math['pool_startup_s']:.1f} s, not timed)"
    )
    judge = bench_judge(args.n_judge, args.repeats)
    if "skipped" in judge:
        print(f"judge: skipped ({judge['skipped']})")
    else:
        c, k = judge["cache"], judge["concurrency"]
        print(
            f"judge, {judge['n']} requests ({c['parsed_verdicts']} parsed): cold cache {c['cold_samples_per_s']:.0f}/s, "
            f"warm {c['warm_samples_per_s']:.0f}/s → warm/cold {c['warm_over_cold']:.1f}× "
            f"({c['warm_http_requests']} HTTP requests when warm)"
        )
        print(
            f"judge concurrency: 1 → {k['c1_samples_per_s']:.0f}/s, 8 → {k['c8_samples_per_s']:.0f}/s "
            f"→ c8/c1 {k['c8_over_c1']:.2f}×"
        )
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "repeats": args.repeats,
        "math_verify": math,
        "judge": judge,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
