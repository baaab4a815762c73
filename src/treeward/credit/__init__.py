"""Credit assignment: pure functions from search trees to values, advantages, preference data and exports."""

from treeward.credit.records import Advantages, PreferenceList, PreferencePair, SFTExample, StepExample

__all__ = ["Advantages", "PreferenceList", "PreferencePair", "SFTExample", "StepExample"]
