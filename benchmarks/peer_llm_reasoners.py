"""treeward vs llm-reasoners (MCTS, BeamSearch, its HF model wrapper) on the shipped policy, side by side.

    .venv/bin/python benchmarks/peer_llm_reasoners.py --n-problems 200

The peer runs in its own virtual environment, in worker subprocesses of this script (``--peer-worker``);
llm-reasoners is a benchmark-only install, never a dependency of treeward. Set it up once, from the repository
root:

    python3 -m venv .peer-venv
    .peer-venv/bin/pip install torch==2.13.0         # the local CPU wheel first, so no CUDA build comes in
    .peer-venv/bin/pip install llm-reasoners==1.0.2  # pulls transformers, peft, accelerate, ... (no nvidia-*)
    .peer-venv/bin/pip install --no-deps -e .        # treeward itself, only for the task and the verifier

What is matched, per problem:

* **Model and prompt.** Both load ``src/treeward/assets/tiny-policy`` in float32 on the CPU and see
  ``<bos>Q: ...\\n``; a step is one line (generation stops at the newline token or EOS, at most 24 new
  tokens). Both sample at temperature 1 from the full distribution (the peer's ``top_k`` is set to 0; its
  default is 50).
* **Problems.** ``treeward.tasks.generate_problems(n, 4, seed=1)``, graded by the ``Answer:`` number.
* **Verifier.** ``treeward.tasks.arithmetic.check_steps``. The peer's reward (and its ``fast_reward``, the
  prior MCTS ranks unexpanded children by) is 1.0 when every line written so far checks, else 0.0: the path
  score (minimum of the step scores) that treeward's ``ArithmeticSteps`` gives. No logprob term: with an exact
  verifier the right next step is one string, so a logprob tie-break cannot change which answer is right.
* **Tokens.** The peer's ``model.generate`` is wrapped to count every new token up to and including the first
  stop token (newline or EOS) of each returned row: treeward's ledger counts the same way. treeward's
  algorithms run under a hard cap of ``--budget`` (1,000) generated tokens per problem; best-of-N's N is set
  after the first round so that it spends about what the hungriest peer configuration spent.
* **Threads and timing.** ``torch.set_num_threads(--threads)`` (default 1) in both processes. Wall and CPU
  time (``time.process_time``) cover the search loop only (model loading excluded) and are divided by the
  number of problems. The problems are run in ``--rounds`` rounds and every configuration runs its share of a
  round before the next round starts, so that load from other jobs on the machine falls on all of them alike.

Peer configurations: ``BeamSearch(beam_size=2, max_depth=12)`` with 8 sampled actions per expansion (its
defaults otherwise: argmax selection, ``last`` reward aggregation; ``max_depth`` as treeward's beam) and
``MCTS(n_iters=4)`` with 8 actions per expansion (all its defaults otherwise: ``w_exp=1``, ``depth_limit=5``,
sum/mean rewards, ``max`` simulation, ``max_reward`` output). The peer searches one problem at a time, one
expansion (8 rows) per ``generate`` call, as its algorithms are written; treeward expands all live nodes of
``--batch-problems`` problems per engine call. How the peer's MCTS spends its iterations here: a parent
visited once has a zero exploration term (``ln 1 = 0``) and a walked child's summed reward (up to 5) beats any
unvisited child's prior (at most 1), so once its first rollout is verified all the way, later iterations
re-walk it and expand nothing; they branch only below a step that scored 0.

treeward rows: beam search (width 2 × 8 expansions, as the README's benchmark), weighted best-of-N with N
matched to the peer's tokens, and depth-first Tree of Thoughts with 8 samples per expansion (the peer's k),
all under the same 1,000-token cap; greedy is a reference row.

To compare another treeward algorithm, add one line to ``TREEWARD`` below. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".peer-venv" / "bin" / "python"
MODEL = ROOT / "src" / "treeward" / "assets" / "tiny-policy"
PROBLEM_SEED = 1  # generate_problems(n, steps, seed=1): the held-out problems every benchmark here uses
STEP_TOKENS = 24  # max new tokens per step, both sides (treeward's beam_search default)
SAMPLE_TOKENS = 92  # max new tokens per whole solution (best-of-N, greedy): 20 × steps + 12, as search_budget
TEMPERATURE = 1.0

#: A knob value replaced after the first round by round(peer tokens per problem / greedy tokens per problem).
MATCHED_N = "matched"


@dataclass
class Algo:
    """One treeward row. ``fn``: a name in ``treeward.search`` or ``"module:function"``; a string
    ``aggregate`` is a name in ``treeward.search``."""

    name: str
    fn: str
    knobs: dict[str, Any] = field(default_factory=dict)


GREEDY = Algo("treeward greedy", "best_of_n", {"n": 1, "temperature": 0.0, "max_tokens": SAMPLE_TOKENS})

# One line per treeward algorithm in the comparison; each runs under the --budget cap. An algorithm that
# cannot be imported is skipped with a note.
TREEWARD = [
    Algo("treeward beam 2×8", "beam_search", {"beam_width": 2, "expansions": 8}),
    Algo(
        "treeward weighted BoN",
        "best_of_n",
        {"n": MATCHED_N, "aggregate": "weighted_vote", "max_tokens": SAMPLE_TOKENS},
    ),
    Algo("treeward ToT-DFS k=8", "tot_dfs", {"samples": 8}),
    Algo("treeward MCTS (defaults)", "mcts", {}),
    # e.g. Algo("treeward DVTS", "dvts", {}),  (the function's own defaults for knobs not given)
]

#: Peer configurations by name: llm-reasoners algorithm, its arguments, and ``k``, the actions per expansion.
PEER: dict[str, dict[str, Any]] = {
    "beam": {
        "label": "llm-reasoners BeamSearch",
        "algo": "BeamSearch",
        "k": 8,
        "kwargs": {"beam_size": 2, "max_depth": 12},
    },
    "mcts": {"label": "llm-reasoners MCTS", "algo": "MCTS", "k": 8, "kwargs": {"n_iters": 4}},
}


# ------------------------------------------------------------------------------------------------------------
# The peer side: runs under .peer-venv/bin/python (llm-reasoners, transformers, torch; treeward without deps)
# ------------------------------------------------------------------------------------------------------------


def peer_worker(args: argparse.Namespace) -> None:
    """Load the peer once, then answer each ``"lo hi"`` line on stdin with a ``RESULT {json}`` line."""
    import logging
    import random
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from importlib.metadata import version

    import numpy as np
    import torch
    import transformers
    from reasoners import Reasoner, SearchConfig, WorldModel
    from reasoners.algorithm import MCTS, BeamSearch
    from reasoners.lm import HFModel

    from treeward.tasks import generate_problems, same_number
    from treeward.tasks.arithmetic import check_steps, parse_answer
    from treeward.tree import Problem

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    cfg = PEER[args.peer_worker]
    k = int(cfg["k"])

    class CountingGenerate:
        """Wraps the HF model's ``generate``: counts new tokens up to and including each row's first stop."""

        def __init__(self, model: Any) -> None:
            self.inner = model.generate
            self.generated = 0
            self.calls = 0
            model.generate = self

        def __call__(self, *a: Any, **kw: Any) -> Any:
            out = self.inner(*a, **kw)
            stops = set(kw["generation_config"].eos_token_id)
            for row in out.sequences[:, kw["input_ids"].shape[1] :].tolist():
                self.generated += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            self.calls += 1
            return out

    def path_ok(problem: Problem, text: str) -> float:
        """The exact step verifier as a path score: 1.0 when every non-blank line so far checks."""
        lines = [ln for ln in text.split("\n") if ln.strip()]
        return float(bool(lines) and all(check_steps(problem, lines)))

    class ArithmeticWorld(WorldModel):
        """State: the lines written so far (with their newlines); terminal at an answer, EOS or a cut line."""

        def init_state(self) -> tuple[str, ...]:
            return ()

        def step(self, state: tuple[str, ...], action: str) -> tuple[tuple[str, ...], dict]:
            return (*state, action), {}

        def is_terminal(self, state: tuple[str, ...]) -> bool:
            return bool(state) and ("Answer:" in state[-1] or not state[-1].endswith("\n"))

    class ArithmeticSearch(SearchConfig):
        """Actions: ``k`` sampled next lines; reward and fast reward: the exact verifier of the path."""

        def __init__(self, lm: HFModel) -> None:
            super().__init__()
            self.lm = lm
            self.expansions = 0

        def get_actions(self, state: tuple[str, ...]) -> list[str]:
            prefix = self.example.prompt + "".join(state)
            out = self.lm.generate(
                ["<bos>" + prefix],  # the tokenizer adds no BOS itself; the policy was trained with one
                max_new_tokens=STEP_TOKENS,
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                num_return_sequences=k,
                eos_token_id="\n",  # HFModel adds the tokenizer's EOS to the stop tokens itself
                hide_input=False,  # HFModel's hide_input cuts by character count, which "<bos>" would shift
            )
            self.expansions += 1
            for text in out.text:
                assert text.startswith(prefix), (prefix, text)
            return [text[len(prefix) :] for text in out.text]

        def fast_reward(self, state: tuple[str, ...], action: str) -> tuple[float, dict]:
            return path_ok(self.example, "".join(state) + action), {}

        def reward(self, state: tuple[str, ...], action: str, **kwargs: Any) -> tuple[float, dict]:
            return path_ok(self.example, "".join(state) + action), {}

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    lm = HFModel(str(args.model), str(args.model), device="cpu", max_batch_size=k, max_new_tokens=STEP_TOKENS)
    counter = CountingGenerate(lm.model)
    search = ArithmeticSearch(lm)
    algo = {"BeamSearch": BeamSearch, "MCTS": MCTS}[cfg["algo"]](**cfg["kwargs"])
    reasoner = Reasoner(ArithmeticWorld(), search, algo)
    problems = generate_problems(args.n_problems, args.steps, seed=PROBLEM_SEED)
    info = {"versions": {p: version(p) for p in ("llm-reasoners", "torch", "transformers")}}
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        lo, hi = map(int, line.split())
        per_problem = []
        calls = counter.calls
        wall, cpu = time.perf_counter(), time.process_time()
        for problem in problems[lo:hi]:
            tokens, expansions = counter.generated, search.expansions
            state = reasoner(problem).terminal_state
            answer = parse_answer("".join(state)) if state else None
            per_problem.append(
                {
                    "id": problem.id,
                    "answer": answer,
                    "correct": answer is not None and same_number(answer, problem.answer),
                    "generated": counter.generated - tokens,
                    "expansions": search.expansions - expansions,
                }
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        chunk = {"per_problem": per_problem, "wall": wall, "cpu": cpu, "calls": counter.calls - calls}
        print("RESULT " + json.dumps(chunk), flush=True)


# ------------------------------------------------------------------------------------------------------------
# The orchestrating side: runs under .venv (treeward) and drives the peer workers
# ------------------------------------------------------------------------------------------------------------


class Tally:
    """One row of the table: per-problem results and timings, accumulated over rounds."""

    def __init__(self, system: str, algorithm: str, knobs: dict[str, Any]) -> None:
        self.system, self.algorithm, self.knobs = system, algorithm, knobs
        self.per_problem: list[dict[str, Any]] = []
        self.wall = self.cpu = 0.0
        self.calls = 0
        self.extra: dict[str, Any] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        self.per_problem += chunk["per_problem"]
        self.wall += chunk["wall"]
        self.cpu += chunk["cpu"]
        self.calls += chunk["calls"]

    def tokens_per_problem(self) -> float:
        return sum(p["generated"] for p in self.per_problem) / len(self.per_problem)

    def row(self) -> dict[str, Any]:
        n = len(self.per_problem)
        row = {
            "system": self.system,
            "algorithm": self.algorithm,
            "knobs": self.knobs,
            "problems": n,
            "accuracy": sum(bool(p["correct"]) for p in self.per_problem) / n,
            "generated_tokens_per_problem": self.tokens_per_problem(),
            "max_generated_tokens": max(p["generated"] for p in self.per_problem),
            "wall_per_problem": self.wall / n,
            "cpu_per_problem": self.cpu / n,
            "wall_seconds": self.wall,
            "engine_calls": self.calls,
            **self.extra,
        }
        if "expansions" in self.per_problem[0]:
            row["expansions_per_problem"] = sum(p["expansions"] for p in self.per_problem) / n
        return row


class PeerProcess:
    """A long-lived peer worker in the peer venv: loads the model once, runs chunks of problems on request."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        if not args.peer_python.exists():
            sys.exit(f"no peer venv at {args.peer_python}: see the setup commands at the top of {__file__}")
        cmd = [str(args.peer_python), __file__, "--peer-worker", name, "--n-problems", str(args.n_problems)]
        cmd += ["--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads)]
        cmd += ["--model", str(args.model)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = self._read("READY ")
        cfg = PEER[name]
        self.tally = Tally(
            "llm-reasoners", cfg["label"], {"algo": cfg["algo"], "k": cfg["k"], **cfg["kwargs"]}
        )
        self.tally.extra = info

    def _read(self, tag: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag):
                out: dict[str, Any] = json.loads(line[len(tag) :])
                return out
        sys.exit(f"peer worker {self.name!r} exited with code {self.proc.wait()}")

    def run(self, lo: int, hi: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{lo} {hi}\n")
        self.proc.stdin.flush()
        self.tally.add(self._read("RESULT "))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


class TreewardRunner:
    """One treeward algorithm with its own policy (own prefix cache and ledger), run chunk by chunk."""

    def __init__(self, algo: Algo, args: argparse.Namespace, matched_n: int | None) -> None:
        import importlib

        import treeward.search
        from treeward.engine.hf import HFPolicy

        module, _, name = algo.fn.rpartition(":")
        try:
            self.fn = getattr(importlib.import_module(module) if module else treeward.search, name)
        except (ImportError, AttributeError) as e:
            raise LookupError(f"{algo.fn}: {e}") from e
        self.knobs = {
            key: matched_n
            if value == MATCHED_N
            else getattr(treeward.search, value)
            if key == "aggregate" and isinstance(value, str)
            else value
            for key, value in algo.knobs.items()
        }
        label = algo.name + (f"@{matched_n}" if MATCHED_N in algo.knobs.values() else "")
        shown = {k: getattr(v, "__name__", v) for k, v in self.knobs.items()}
        self.tally = Tally("treeward", label, {"fn": algo.fn, "budget": args.budget, **shown})
        self.policy = HFPolicy.from_pretrained(args.model)
        self.args = args

    def run(self, problems: list[Any]) -> None:
        from treeward.search.core import grade
        from treeward.tasks import ArithmeticAnswer, ArithmeticSteps

        a = self.args
        trees = []
        calls = self.policy.ledger.total.calls
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(problems), a.batch_problems):
            chunk = problems[i : i + a.batch_problems]
            trees += self.fn(chunk, self.policy, ArithmeticSteps(), a.budget, seed=a.seed, **self.knobs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        grade(trees, ArithmeticAnswer())
        per_problem = [
            {
                "id": t.problem.id,
                "answer": t.answer,
                "correct": bool(t.correct),
                "generated": t.ledger["generated"],
            }
            for t in trees
        ]
        calls = self.policy.ledger.total.calls - calls
        self.tally.add({"per_problem": per_problem, "wall": wall, "cpu": cpu, "calls": calls})


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| system | algorithm | accuracy | generated tokens/problem | wall s/problem | CPU s/problem |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        numbers = (
            r["accuracy"],
            r["generated_tokens_per_problem"],
            r["wall_per_problem"],
            r["cpu_per_problem"],
        )
        cells = [
            r["system"],
            r["algorithm"],
            *(f"{x:.{d}f}" for x, d in zip(numbers, (3, 0, 3, 3), strict=True)),
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-problems", type=int, default=200)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--rounds", type=int, default=4, help="interleave the configurations over this many rounds"
    )
    ap.add_argument(
        "--budget", type=int, default=1000, help="treeward's hard cap, generated tokens per problem"
    )
    ap.add_argument("--batch-problems", type=int, default=16, help="treeward: problems per search call")
    ap.add_argument("--peer", nargs="*", default=list(PEER), choices=list(PEER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "peer_llm_reasoners.json")
    ap.add_argument("--peer-worker", choices=list(PEER), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return

    import torch
    import transformers

    from treeward.tasks import generate_problems

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    problems = generate_problems(args.n_problems, args.steps, seed=PROBLEM_SEED)
    # rounds of whole treeward batches, so that chunking leaves no extra partial batch
    size = -(-args.n_problems // args.rounds // args.batch_problems) * args.batch_problems
    bounds = [(lo, min(lo + size, args.n_problems)) for lo in range(0, args.n_problems, size)]
    print(
        f"{args.n_problems} problems ({args.steps} steps) in {len(bounds)} rounds; "
        f"torch threads {args.threads} on both sides; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    peers = [PeerProcess(name, args) for name in args.peer]
    greedy = TreewardRunner(GREEDY, args, None)
    runners: list[TreewardRunner] = []
    for r, (lo, hi) in enumerate(bounds):
        t0 = time.perf_counter()
        for p in peers:
            p.run(lo, hi)
        greedy.run(problems[lo:hi])
        if r == 0:
            target = max((p.tally.tokens_per_problem() for p in peers), default=args.budget)
            matched_n = max(1, round(target / greedy.tally.tokens_per_problem()))
            for algo in TREEWARD:
                try:
                    runners.append(TreewardRunner(algo, args, matched_n))
                except LookupError as e:
                    print(f"skipped {algo.name}: {e}", flush=True)
        for t in runners:
            t.run(problems[lo:hi])
        print(
            f"round {r + 1}/{len(bounds)}: problems {lo}-{hi - 1}, {time.perf_counter() - t0:.0f} s, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    for p in peers:
        p.close()

    tallies = {t.algorithm: t for t in [*(p.tally for p in peers), greedy.tally, *(r.tally for r in runners)]}
    peer_rows = [p.tally.row() for p in peers]
    tw_rows = [t.tally.row() for t in runners]
    rows = [*peer_rows, greedy.tally.row(), *tw_rows]
    print_table(rows)
    best = max(tw_rows, key=lambda r: (r["accuracy"], -r["wall_per_problem"]))
    ratios = []
    for peer in peer_rows:
        q = {
            "treeward": best["algorithm"],
            "peer": peer["algorithm"],
            "accuracy_difference": best["accuracy"] - peer["accuracy"],
            "tokens_ratio": best["generated_tokens_per_problem"] / peer["generated_tokens_per_problem"],
            "wall_per_problem_ratio": best["wall_per_problem"] / peer["wall_per_problem"],
            "cpu_per_problem_ratio": best["cpu_per_problem"] / peer["cpu_per_problem"],
        }
        q["target_met"] = q["accuracy_difference"] >= 0 and q["wall_per_problem_ratio"] <= 0.5
        # paired by problem: how many only one side got right (the accuracy difference's noise is in these)
        ours = {p["id"]: bool(p["correct"]) for p in tallies[best["algorithm"]].per_problem}
        theirs = {p["id"]: bool(p["correct"]) for p in tallies[peer["algorithm"]].per_problem}
        q["only_treeward_correct"] = sum(ours[i] and not theirs[i] for i in ours)
        q["only_peer_correct"] = sum(theirs[i] and not ours[i] for i in ours)
        ratios.append(q)
        print(
            f"{best['algorithm']} / {peer['algorithm']}: accuracy {q['accuracy_difference']:+.3f}, "
            f"tokens {q['tokens_ratio']:.2f}×, wall per problem {q['wall_per_problem_ratio']:.2f}×, "
            f"CPU per problem {q['cpu_per_problem_ratio']:.2f}×, right on one side only: "
            f"{q['only_treeward_correct']} treeward / {q['only_peer_correct']} peer "
            f"(target: accuracy ≥ peer and wall ≤ 0.50×: {'met' if q['target_met'] else 'NOT met'})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: str(v) for k, v in vars(args).items() if k != "peer_worker"},
        "rounds": bounds,
        "peer_configs": PEER,
        "rows": rows,
        "best_treeward": best["algorithm"],
        "ratios": ratios,
        "per_problem": {name: t.per_problem for name, t in tallies.items()},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
