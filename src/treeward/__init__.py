"""treeward: compose rewards, search with them at test time, and turn search trees into training signal.

``import treeward`` is cheap: torch and transformers load only when a model-backed part is used
(``treeward.engine.HFPolicy``).
"""

from treeward._paths import SHIPPED_POLICY
from treeward.tree import Node, Problem, Tree, read_jsonl, write_jsonl

__version__ = "0.1.0"

__all__ = ["SHIPPED_POLICY", "Node", "Problem", "Tree", "__version__", "read_jsonl", "write_jsonl"]
