"""Moved to ``okd.sources``; these names stay importable from here for earlier code."""

from okd.sources.ground_truth import GroundTruthSource, SourceState

__all__ = ["GroundTruthSource", "SourceState"]
