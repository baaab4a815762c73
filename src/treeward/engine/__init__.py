"""Engines: the :class:`Policy` contract, the compute :class:`Ledger`, and backends (``hf``; more to come)."""

from treeward.engine.base import Continuation, Counts, FinishReason, Ledger, Policy

__all__ = ["Continuation", "Counts", "FinishReason", "HFPolicy", "Ledger", "Policy"]


def __getattr__(name: str) -> object:
    # The HF backend imports torch and transformers (seconds); load it only when asked for.
    if name == "HFPolicy":
        from treeward.engine.hf import HFPolicy

        return HFPolicy
    raise AttributeError(f"module 'treeward.engine' has no attribute {name!r}")
