"""Where the package keeps the files it ships."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: The shipped tiny Llama policy and its tokenizer (``from_pretrained``-loadable folder).
SHIPPED_POLICY = ASSETS / "tiny-policy"
#: The shipped tiny outcome reward model (a sequence classifier on the policy's backbone, trained by
#: ``python -m treeward.train.value``), loadable with ``treeward.rewards.model.ClassifierReward``.
SHIPPED_RM = ASSETS / "tiny-rm"
#: The shipped learned PRM (an LM-head PRM: the policy as a causal LM scoring two label tokens, trained on
#: Monte-Carlo step values from search trees by ``python -m treeward.train.prm``), loadable with
#: ``treeward.rewards.model.ProcessRewardModel``.
SHIPPED_PRM = ASSETS / "tiny-prm"
