"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    blocks = _blocks()
    assert blocks, "the README has no Python example"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 9  # one line per problem, then the ledger total
    assert printed[-1].startswith("Counts(")


def test_readme_credit_example_runs() -> None:
    blocks = _blocks()
    assert len(blocks) >= 2, "the README lost its trees-to-training-signal example"
    scope: dict[str, object] = {"__name__": "readme"}
    exec(compile(blocks[1], str(README), "exec"), scope)  # its own assert checks the token expansion
    adv = scope["adv"]
    assert any(v != 0 for row in adv.values for v in row)  # type: ignore[attr-defined]  # the tree has mixed leaves
    assert scope["prm"] and scope["dpo"]
