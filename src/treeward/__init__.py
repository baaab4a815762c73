"""treeward: compose rewards, search with them at test time, and turn search trees into training signal."""

__version__ = "0.1.0"
