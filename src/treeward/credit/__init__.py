"""Credit assignment: pure functions from search trees to values, advantages, preference data and exports."""

from treeward.credit.records import PreferenceList, PreferencePair, SFTExample, StepExample

__all__ = ["PreferenceList", "PreferencePair", "SFTExample", "StepExample"]
