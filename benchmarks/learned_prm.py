"""The shipped learned PRM against the exact step verifier: step-level AUC on held-out trees, and search with it.

    .venv/bin/python benchmarks/learned_prm.py --n-problems 200

The PRM is any :class:`~treeward.rewards.model.ProcessRewardModel` folder (``--prm``; its head, token
classification or LM label tokens, is read from the folder and recorded in the JSON).

1. **Step AUC.** Tree rollouts (8 leaves, temperature 1) from the shipped policy on held-out problems (problems
   seed 1, 1–4 steps cycled; the PRM's training problems exclude every seed-1 prompt). Every step node that lies on
   a root-to-terminal path gets the PRM's step score (read once per node: the model is causal, so a step's score
   does not depend on what follows) and two labels from the exact step verifier
   (:func:`~treeward.tasks.arithmetic.check_steps` on the path up to the step): ``prefix`` (every step so far is
   right: what the verifier scores the prefix as search reads it, ``ArithmeticSteps`` reduces steps by ``min``)
   and ``step`` (this step alone is right, judged from the result the previous step wrote). AUC of the step
   scores against each; plus the path score (``min`` over steps) against the exact outcome verifier, per path.
2. **Search at 4 steps, ≤ budget generated tokens per problem** (held-out problems seed 1, the same as
   ``benchmarks/search_budget.py``): beam search with the exact step verifier and with the learned PRM; weighted
   best-of-N with each, N matched to what beam with the verifier spent; greedy. Same problems, same seed, one run.

Prints the numbers and ratios; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from treeward._paths import SHIPPED_POLICY, SHIPPED_PRM
from treeward.engine.hf import HFPolicy
from treeward.rewards.model import ProcessRewardModel
from treeward.search import beam_search, best_of_n, best_score, weighted_vote
from treeward.search.core import grade, path_sample
from treeward.search.rollouts import tree_rollouts
from treeward.tasks import ArithmeticAnswer, ArithmeticSteps, generate_problems
from treeward.tasks.arithmetic import check_steps
from treeward.train.value import roc_auc


def step_auc(args, prm):  # type: ignore[no-untyped-def]
    policy = HFPolicy.from_pretrained(args.model)
    problems = generate_problems(args.auc_problems, [1, 2, 3, 4], seed=1)
    t0 = time.perf_counter()
    trees = tree_rollouts(problems, policy, leaves=8, seed=args.seed + 7)
    grade(trees, ArithmeticAnswer())
    t_trees = time.perf_counter() - t0
    ends = []  # the deepest non-empty step of each terminal path (an EOS-only step has no text)
    for t in trees:
        for term in t.terminals():
            end = term if term.text else t.nodes[term.parent or 0]
            if end.id != 0:
                ends.append((t, end, term))
    t1 = time.perf_counter()
    results = prm([path_sample(t, end) for t, end, _ in ends])
    t_score = time.perf_counter() - t1
    seen: set[tuple[str, int]] = set()
    rows = []  # (score, prefix label, step label, depth, problem steps)
    paths = []  # (min score, outcome)
    unscored = 0
    for (t, end, term), res in zip(ends, results, strict=True):
        if res.step_scores is None:
            unscored += 1
            continue
        path = t.path(end.id)[1:]
        ok = check_steps(t.problem, [n.text for n in path])
        for k, (node, sc) in enumerate(zip(path, res.step_scores, strict=True)):
            if (t.problem.id, node.id) in seen:
                continue
            seen.add((t.problem.id, node.id))
            rows.append((sc, all(ok[: k + 1]), ok[k], k + 1, t.problem.metadata["n_steps"]))
        if term.outcome is not None and res.score is not None:
            paths.append((res.score, term.outcome == 1.0))
    by_steps = {}
    for s in (1, 2, 3, 4):
        sub = [r for r in rows if r[4] == s]
        if sub and 0 < sum(r[1] for r in sub) < len(sub):
            by_steps[str(s)] = round(roc_auc([r[0] for r in sub], [r[1] for r in sub]), 4)
    out = {
        "problems": len(problems),
        "trees_seconds": round(t_trees, 1),
        "prm_seconds": round(t_score, 1),
        "step_nodes": len(rows),
        "prefix_correct": sum(r[1] for r in rows),
        "step_correct": sum(r[2] for r in rows),
        "unscored_paths": unscored,
        "auc_prefix": round(roc_auc([r[0] for r in rows], [r[1] for r in rows]), 4),
        "auc_step": round(roc_auc([r[0] for r in rows], [r[2] for r in rows]), 4),
        "auc_prefix_by_problem_steps": by_steps,
        "paths": len(paths),
        "paths_correct": sum(y for _, y in paths),
        "auc_path_min_vs_outcome": round(roc_auc([s for s, _ in paths], [y for _, y in paths]), 4),
    }
    print(
        f"step AUC on {len(rows)} held-out step nodes ({out['prefix_correct']} with a correct prefix): "
        f"prefix {out['auc_prefix']:.4f}, own step {out['auc_step']:.4f}; by problem steps {by_steps}; "
        f"path min vs outcome {out['auc_path_min_vs_outcome']:.4f} on {len(paths)} paths",
        flush=True,
    )
    return out


def run(name, fn, scorer, problems, args, **knobs):  # type: ignore[no-untyped-def]
    policy = HFPolicy.from_pretrained(args.model)  # a fresh policy: empty prefix cache, empty ledger
    trees = []
    t0 = time.perf_counter()
    for i in range(0, len(problems), args.batch_problems):
        chunk = problems[i : i + args.batch_problems]
        trees.extend(fn(chunk, policy, scorer, args.budget, seed=args.seed, **knobs))
    wall = time.perf_counter() - t0
    grade(trees, ArithmeticAnswer())
    gen = sum(t.ledger["generated"] for t in trees)
    row = {
        "algorithm": name,
        "scorer": scorer.name,
        "knobs": {k: getattr(v, "__name__", v) for k, v in knobs.items()},
        "accuracy": sum(bool(t.correct) for t in trees) / len(trees),
        "generated_tokens_per_problem": gen / len(trees),
        "max_generated_tokens": max(t.ledger["generated"] for t in trees),
        "scored_tokens_per_problem": policy.ledger.total.scored / len(trees),
        "wall_seconds": round(wall, 1),
    }
    print(
        f"{name:<24} acc {row['accuracy']:.3f}  tokens/problem {row['generated_tokens_per_problem']:6.1f} "
        f"(max {row['max_generated_tokens']})  scored/problem {row['scored_tokens_per_problem']:7.0f}  "
        f"wall {wall:6.1f} s",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_POLICY)
    ap.add_argument("--prm", type=Path, default=SHIPPED_PRM)
    ap.add_argument("--n-problems", type=int, default=200, help="search problems (4 steps)")
    ap.add_argument("--auc-problems", type=int, default=200, help="held-out problems for the step AUC")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--expansions", type=int, default=8)
    ap.add_argument("--batch-problems", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--auc-only", action="store_true", help="skip the searches (quick PRM checks)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/learned_prm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    prm = ProcessRewardModel(args.prm, name="learned_prm")
    exact = ArithmeticSteps()
    auc = step_auc(args, prm)
    if args.auc_only:
        return
    problems = generate_problems(args.n_problems, args.steps, seed=1)
    cap = 20 * args.steps + 12
    beam = {"beam_width": args.beam_width, "expansions": args.expansions}
    greedy = run("greedy", best_of_n, exact, problems, args, n=1, temperature=0.0, max_tokens=cap)
    beam_exact = run("beam+exact", beam_search, exact, problems, args, **beam)
    beam_prm = run("beam+prm", beam_search, prm, problems, args, **beam)
    n = max(1, round(beam_exact["generated_tokens_per_problem"] / greedy["generated_tokens_per_problem"]))
    bon = {"n": n, "max_tokens": cap, "aggregate": weighted_vote}
    bon_exact = run(f"weighted-bon@{n}+exact", best_of_n, exact, problems, args, **bon)
    bon_prm = run(f"weighted-bon@{n}+prm", best_of_n, prm, problems, args, **bon)
    best_prm = run(f"best-of-{n}+prm", best_of_n, prm, problems, args, **{**bon, "aggregate": best_score})
    rows = [greedy, beam_exact, beam_prm, bon_exact, bon_prm, best_prm]
    ratios = {
        "beam_prm_over_beam_exact_accuracy": beam_prm["accuracy"] / beam_exact["accuracy"],
        "beam_prm_over_weighted_bon_prm_accuracy": beam_prm["accuracy"] / bon_prm["accuracy"],
        "beam_prm_over_greedy_accuracy": beam_prm["accuracy"] / greedy["accuracy"],
        "beam_prm_tokens_over_budget": beam_prm["max_generated_tokens"] / args.budget,
    }
    print(
        f"beam+prm / beam+exact accuracy {ratios['beam_prm_over_beam_exact_accuracy']:.2f}×, "
        f"/ weighted-bon+prm {ratios['beam_prm_over_weighted_bon_prm_accuracy']:.2f}×, "
        f"/ greedy {ratios['beam_prm_over_greedy_accuracy']:.2f}×; "
        f"max tokens / budget {ratios['beam_prm_tokens_over_budget']:.2f}"
    )
    targets = {
        "step_auc_prefix_ge_0.9": auc["auc_prefix"] >= 0.9,
        "beam_prm_ge_0.70_at_budget": beam_prm["accuracy"] >= 0.70
        and beam_prm["max_generated_tokens"] <= args.budget,
    }
    print(f"targets: {targets}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "prm_head": prm.head,
        "step_auc": auc,
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
