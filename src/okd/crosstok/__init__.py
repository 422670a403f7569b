"""Distillation across tokenizers (``method.cross_tokenizer``: ``uld`` or ``align``).

* ``okd.crosstok.alignment``: text spans of two tokenizations aligned by character offsets, and the
  vocabulary two tokenizers share;
* ``okd.crosstok.data``: the teacher's own tokenization of each example and the alignment, batched;
* ``okd.crosstok.losses``: the ULD loss and the span-aligned loss;
* ``okd.crosstok.training``: the hooks of a run (checks, data, the step's loss).
"""

from .alignment import SharedVocabulary, align_spans, boundaries
from .data import CROSS_TOKENIZER_MODES, CrossTokenizerCollator, CrossTokenizerDataset
from .losses import CrossTokenizerLoss, aligned_loss, uld_loss

__all__ = [
    "CROSS_TOKENIZER_MODES",
    "CrossTokenizerCollator",
    "CrossTokenizerDataset",
    "CrossTokenizerLoss",
    "SharedVocabulary",
    "align_spans",
    "aligned_loss",
    "boundaries",
    "uld_loss",
]
