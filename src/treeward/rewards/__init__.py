"""Rewards: the :class:`Reward` contract shared by outcome and process rewards."""

from treeward.rewards.base import Reward, RewardResult, Sample, Status

__all__ = ["Reward", "RewardResult", "Sample", "Status"]
