"""Where the package keeps the files it ships."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped tiny Llama policy and its tokenizer (``from_pretrained``-loadable folder).
SHIPPED_POLICY = ASSETS / "tiny-policy"
