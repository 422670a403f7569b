"""Which features of the teacher's next-token distribution does each student transfer? (``okd analyze``)

The paper's argument (Rao et al. 2024, *Online Knowledge Distillation*) is that reverse KL makes a
student copy the teacher's dominant mode but not the rest of its distribution (secondary modes,
entropy, tail), and that student-generated outputs fight exposure bias. This module measures those
features token by token, on the same positions the training loss uses, so that students trained with
different methods can be compared on them.

Conventions
-----------
* **p is the teacher, q is the student** (as in :mod:`okd.divergences`). Per-token functions take
  ``teacher_logits`` and ``student_logits`` of shape ``[..., V]`` (any float dtype, same shape) and
  return float64 values of shape ``[...]``; all the maths is done in float64, so identities such as
  "identical distributions give KL 0" hold to ~1e-15.
* **Which tokens count.** The positions whose *next* token is a response token: the mask of
  :func:`okd.training.next_token_targets` (labels ``-100`` mark prompt and padding). Aggregates are
  token-weighted means over those positions, over the whole data set.
* **k and n are clamped to V.** ``top-k`` metrics use ``min(k, V)`` tokens and the rank correlation
  ``min(n, V)``; result keys keep the requested number (``top5_overlap`` even when V < 5).
* **Ties.** ``topk`` and ``argmax`` break ties by index (deterministically), so identical inputs always
  give identical top sets; the rank correlation averages the ranks of tied values.

Per-token metrics (:func:`pair_metrics` computes them all at once; most also have their own function):

* ``top1_agreement``: 1 if ``argmax p == argmax q`` else 0;
* ``top{k}_overlap``: ``|topk(q) ∩ topk(p)| / k``;
* ``top{k}_coverage``: ``sum_{v in topk(q)} p_v``, the teacher mass that the student's top-k covers;
* ``student_mass_outside_teacher_top{k}``: ``sum_{v not in topk(p)} q_v``;
* ``teacher_mass_outside_student_top{k}``: ``sum_{v not in topk(q)} p_v`` (= 1 - coverage);
* ``teacher_entropy``, ``student_entropy``: ``H(p)``, ``H(q)`` in nats;
* ``entropy_gap``, ``abs_entropy_gap``: ``H(q) - H(p)`` and its absolute value;
* ``forward_kl``, ``reverse_kl``: ``KL(p || q)``, ``KL(q || p)``;
* ``tvd``: ``0.5 * sum_v |p_v - q_v|``;
* ``spearman_top{n}``: Spearman's rho of teacher vs student logits over the teacher's top-n tokens.

Against the ground-truth next token (:func:`model_metrics`, for either model): ``nll``, ``accuracy``
(argmax correct), ``confidence`` (max probability), ``entropy``; and the expected calibration error
(:func:`expected_calibration_error`) from confidence and accuracy.

Exposure bias (:func:`accumulated_error`, :func:`ex_acc_err`) follows MiniLLM (Gu et al. 2024), which
follows Arora et al. (2022); see :func:`exposure_bias` for the exact estimator.

Public API: the per-token functions above, :func:`masked_mean`, :func:`analyze` (models in memory),
:func:`run_analysis` (paths, what ``okd analyze`` calls), :func:`format_table`, :func:`make_plots`;
the options of :func:`analyze` are :class:`AnalysisConfig`. All are importable from ``okd.analysis``.

Layout (one concern per module):

* :mod:`okd.analysis.metrics`: per-token metrics, :func:`masked_mean`, calibration (ECE);
* :mod:`okd.analysis.exposure`: exposure bias (accumulated error, ExAccErr, free-running ROUGE-L);
* :mod:`okd.analysis.passes`: running the models (batched logits, metric chunks, sampling) and the
  teacher-forced pass over a data set that accumulates the metrics;
* :mod:`okd.analysis.config`: :class:`AnalysisConfig`, the options of an analysis;
* :mod:`okd.analysis.run`: :func:`analyze` and :func:`run_analysis` (model loading from paths);
* :mod:`okd.analysis.report`: :func:`format_table` and :func:`make_plots`.
"""

from okd.analysis.config import AnalysisConfig
from okd.analysis.exposure import DEFAULT_EXPOSURE_LENGTHS, accumulated_error, ex_acc_err, exposure_bias
from okd.analysis.metrics import (
    DEFAULT_RANK_TOP,
    DEFAULT_TOP_KS,
    ECE_BINS,
    calibration_bins,
    ece_from_bins,
    entropy,
    expected_calibration_error,
    forward_kl_tokens,
    masked_mean,
    model_metrics,
    pair_metrics,
    reverse_kl_tokens,
    spearman_top,
    tail_mass,
    top1_agreement,
    topk_coverage,
    topk_overlap,
    tvd_tokens,
)
from okd.analysis.report import format_table, make_plots
from okd.analysis.run import analyze, resolve_model_path, run_analysis

__all__ = [
    "DEFAULT_EXPOSURE_LENGTHS",
    "DEFAULT_RANK_TOP",
    "DEFAULT_TOP_KS",
    "ECE_BINS",
    "AnalysisConfig",
    "accumulated_error",
    "analyze",
    "calibration_bins",
    "ece_from_bins",
    "entropy",
    "ex_acc_err",
    "expected_calibration_error",
    "exposure_bias",
    "format_table",
    "forward_kl_tokens",
    "make_plots",
    "masked_mean",
    "model_metrics",
    "pair_metrics",
    "resolve_model_path",
    "reverse_kl_tokens",
    "run_analysis",
    "spearman_top",
    "tail_mass",
    "top1_agreement",
    "topk_coverage",
    "topk_overlap",
    "tvd_tokens",
]
