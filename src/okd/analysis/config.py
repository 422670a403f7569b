"""The options of an analysis (:class:`AnalysisConfig`): what ``analyze`` measures and how it batches."""

from __future__ import annotations

from dataclasses import dataclass, fields

from okd.analysis.metrics import DEFAULT_RANK_TOP, DEFAULT_TOP_KS, ECE_BINS

DEFAULT_EXPOSURE_LENGTHS = (5, 10, 20, 40)  # the l of ExAccErr(l) (okd.analysis.exposure)


@dataclass
class AnalysisConfig:
    """Options of :func:`okd.analysis.analyze` (also accepted as its keyword arguments)."""

    batch_size: int = 8
    """Sequences per forward pass (and per generation batch)."""
    top_ks: tuple[int, ...] = DEFAULT_TOP_KS
    """The k of the top-k metrics (clamped to the vocabulary size; result keys keep the requested k)."""
    rank_top: int = DEFAULT_RANK_TOP
    """n of the Spearman rank correlation over the teacher's top-n tokens."""
    ece_bins: int = ECE_BINS
    """Equal-width confidence bins of the expected calibration error."""
    position_curve_length: int = 64
    """Response positions in the per-position curves."""
    histogram_bins: int = 40
    """Bins of the entropy-gap histogram (shared by every student)."""
    max_histogram_tokens: int = 100_000
    """The histogram uses at most this many tokens per student (the first in data order)."""
    exposure_examples: int = 32
    """Prompts sampled for the exposure-bias measurement (0 skips it)."""
    max_new_tokens: int = 64
    """Tokens sampled per prompt for the exposure-bias measurement."""
    exposure_lengths: tuple[int, ...] = DEFAULT_EXPOSURE_LENGTHS
    """The l at which ExAccErr(l) is reported (capped at max_new_tokens)."""
    seed: int = 0
    """Sampling seed (the same for every model)."""
    chunk_tokens: int = 256
    """Tokens per float64 metric chunk (memory only; results do not depend on it)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        minimums = {"batch_size": 1, "rank_top": 1, "ece_bins": 1, "exposure_examples": 0, "max_new_tokens": 1,
                    "position_curve_length": 1, "histogram_bins": 1}
        for option, minimum in minimums.items():
            if getattr(self, option) < minimum:
                raise ValueError(f"{option} must be >= {minimum}, got {getattr(self, option)}")
        if not self.top_ks or min(self.top_ks) < 1:
            raise ValueError(f"top_ks must be a non-empty list of ints >= 1, got {list(self.top_ks)}")

    @classmethod
    def from_options(cls, config: AnalysisConfig | None = None, **options) -> AnalysisConfig:
        """``config`` (default: the defaults) with ``options`` overriding its fields; a one-line
        ``TypeError`` naming an unknown option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown analysis option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        base = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        return cls(**{**base, **options})
