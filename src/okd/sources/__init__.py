"""Where the training loop's sequences come from: one ``Source`` per ``method.source``.

* ``ground_truth``: the data set's responses (``GroundTruthSource``);
* ``teacher_generated``: the teacher's responses, generated once and cached (SeqKD);
* ``on_policy``: the current student's samples with probability ``sampling.on_policy_ratio`` (GKD, ImitKD);
* ``adaptive_replay``: DistiLLM's adaptive off-policy replay of student samples;
* ``teacher_mixed``: MiniLLM's rollouts from a student/teacher mixture, reused for PPO epochs.

``base`` defines the interface and the registry; each module registers its source on import.
"""

from .base import SOURCES, Source, SourceSetup, build_source, register_source, source_names
from .ground_truth import GroundTruthSource, SourceState
from .teacher_generated import TeacherGeneratedSource
from .on_policy import OnPolicySource, StudentGenerationSource
from .adaptive_replay import AdaptiveReplaySource, ReplayBuffer
from .teacher_mixed import TeacherMixedSource

__all__ = [
    "SOURCES",
    "AdaptiveReplaySource",
    "GroundTruthSource",
    "OnPolicySource",
    "ReplayBuffer",
    "Source",
    "SourceSetup",
    "SourceState",
    "StudentGenerationSource",
    "TeacherGeneratedSource",
    "TeacherMixedSource",
    "build_source",
    "register_source",
    "source_names",
]
