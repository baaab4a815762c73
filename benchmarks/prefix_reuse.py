"""Prefix KV reuse in HFPolicy: wide one-step expansion of one ~150-token prefix, with and without the cache.

Phase "one step": n = 16 and 64 branches from one prefix, 16 new tokens each (``stop=None``, so every branch is the
same length). With reuse the prefix is prefilled once and its KV copied to the branches; without it every branch
prefills the whole prefix, as plain batched sampling does. The store starts empty for every timed run, so this is
within-call reuse only.

Phase "child step": each of 16 continuations from phase one is expanded by one more step (16 child prefixes,
n = 1). With reuse, every child's prefix (prompt + its first step, minus the step's last token) comes from the
store filled by phase one; without it every child prefills ~166 tokens.

Each configuration gets a warm-up call, then ``--repeats`` timed calls, interleaved between the two policies (the
order alternates) so that drift in machine load hits both; the best time is reported. Computed tokens come from the
policy's ledger and are exact.

    python benchmarks/prefix_reuse.py [--model PATH] [--out benchmarks/out/prefix_reuse.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from treeward._paths import SHIPPED_POLICY
from treeward.engine.hf import HFPolicy

PREFIX_TOKENS = 150
NEW_TOKENS = 16


def load_policies(model: str | None) -> tuple[HFPolicy, HFPolicy, str]:
    """The same model and tokenizer behind a caching and a non-caching policy, and a description of the source."""
    if model is None and (SHIPPED_POLICY / "config.json").is_file():
        model = str(SHIPPED_POLICY)
    if model is not None:
        cached = HFPolicy.from_pretrained(model)
        source = model
    else:
        from treeward.train.pretrain import build_model, build_tokenizer

        tokenizer = build_tokenizer(n_texts=2000)
        torch.manual_seed(0)
        net = build_model(
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ).eval()
        cached = HFPolicy(net, tokenizer)
        source = "random init, shipped config (vocab 320, hidden 192, MLP 512, 4 layers, 4 heads)"
    plain = HFPolicy(cached.model, cached.tokenizer, prefix_cache=False)
    return cached, plain, source


def make_prefix(policy: HFPolicy) -> list[int]:
    """The longest of 200 four-step prompts with its first three worked steps (~130 tokens): the model goes on with
    step 4 and the answer, so branches run their full ``NEW_TOKENS`` instead of stopping at EOS. (The shipped model
    never saw five-step problems and answers after four steps, so a longer prefix of that kind would not do.)"""
    from treeward.tasks.arithmetic import generate_problems, solution_text

    best: list[int] = []
    for problem in generate_problems(200, 4, seed=1):
        steps = solution_text(problem).split("\n")[:3]
        ids = policy.encode_prompt(problem.prompt + "\n".join(steps) + "\n")
        best = max(best, ids, key=len)
    return best


@dataclass
class Row:
    phase: str
    branches: int
    seconds: dict[str, float]  # best wall time per policy
    ledger: dict[str, dict[str, int]]  # per policy: the counts of one call

    @property
    def speedup(self) -> float:
        return self.seconds["no reuse"] / self.seconds["reuse"]


def measure(
    phase: str,
    branches: int,
    policies: dict[str, HFPolicy],
    run: Callable[[HFPolicy], object],
    setup: Callable[[HFPolicy], object],
    repeats: int,
) -> Row:
    """Best wall time of ``run`` per policy after one warm-up, runs interleaved (order alternating per repeat);
    ``setup`` runs untimed before each. Then one more untimed call per policy for its ledger counts."""
    names = list(policies)
    for name in names:
        setup(policies[name])
        run(policies[name])
    best = dict.fromkeys(names, float("inf"))
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            setup(policies[name])
            t0 = time.perf_counter()
            run(policies[name])
            best[name] = min(best[name], time.perf_counter() - t0)
    ledger = {}
    for name, policy in policies.items():
        setup(policy)
        policy.ledger.reset()
        run(policy)
        ledger[name] = policy.ledger.total.to_dict()
    return Row(phase, branches, best, ledger)


def one_step(policy: HFPolicy, prefix: list[int], n: int) -> object:
    return policy.expand([prefix], n=n, max_new_tokens=NEW_TOKENS, stop=None, seeds=0)


def fill_store(policy: HFPolicy, prefix: list[int]) -> None:
    """Empty the store, then (caching policy only) run phase one so the children's prefixes are stored."""
    policy.clear_cache()
    if policy.prefix_cache:
        one_step(policy, prefix, 16)


def child_step(policy: HFPolicy, children: list[list[int]]) -> object:
    return policy.expand(children, n=1, max_new_tokens=NEW_TOKENS, stop=None, seeds=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped policy if present)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/prefix_reuse.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: a 2M-parameter model gains little from more, and on a busy "
        "machine spinning OpenMP threads can slow it down many times over)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cached, plain, source = load_policies(args.model)
    policies = {"reuse": cached, "no reuse": plain}
    prefix = make_prefix(cached)
    rows = [
        measure(
            "one step", n, policies, partial(one_step, prefix=prefix, n=n), HFPolicy.clear_cache, args.repeats
        )
        for n in (16, 64)
    ]
    # The 16 continuations of phase one (the same tokens with and without the cache), one more step each.
    cached.clear_cache()
    children = [
        [*prefix, *c.token_ids]
        for c in cached.expand([prefix], n=16, max_new_tokens=NEW_TOKENS, stop=None)[0]
    ]
    rows.append(
        measure(
            "child step",
            16,
            policies,
            partial(child_step, children=children),
            partial(fill_store, prefix=prefix),
            args.repeats,
        )
    )

    print(f"model: {source}")
    print(
        f"prefix {len(prefix)} tokens, {NEW_TOKENS} new tokens per branch, {args.threads} thread(s), best of {args.repeats}"
    )
    header = f"{'phase':<11} {'branches':>8} {'reuse s':>9} {'no reuse s':>11} {'speed-up':>9}  computed: reuse / no reuse"
    print(header)
    print("-" * len(header))
    for row in rows:
        t, led = row.seconds, row.ledger
        print(
            f"{row.phase:<11} {row.branches:>8} {t['reuse']:>9.3f} {t['no reuse']:>11.3f} "
            f"{row.speedup:>8.2f}x  {led['reuse']['computed']} / {led['no reuse']['computed']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": source,
        "prefix_tokens": len(prefix),
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": [{**asdict(row), "speedup": row.speedup} for row in rows],
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
