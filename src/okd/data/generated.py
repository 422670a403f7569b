"""Moved: the generation-based sources live in ``okd.sources``, generation in ``okd.generation`` and
``build_batch`` in ``okd.data.instruction``. These names stay importable from here for earlier code."""

from okd.data.instruction import build_batch
from okd.generation import generate_responses
from okd.sources import AdaptiveReplaySource, OnPolicySource, ReplayBuffer, TeacherGeneratedSource

__all__ = [
    "AdaptiveReplaySource",
    "OnPolicySource",
    "ReplayBuffer",
    "TeacherGeneratedSource",
    "build_batch",
    "generate_responses",
]
