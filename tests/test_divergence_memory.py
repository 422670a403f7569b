"""The chunked divergences' memory bound: at most one gradient buffer plus one chunk of temporaries.

The module docstring of ``okd.divergences`` promises that the forward and backward never hold more than
the gradient buffer of each input that needs one and the float32 temporaries of a single chunk of
``chunk_tokens`` rows. This measures the peak of the CPU allocations made during one forward + backward
(torch's profiler records every allocation and free with ``profile_memory=True``) and checks it against
that bound. The bound counts allocations, not seconds, so it does not depend on the machine's load.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from okd.divergences import DIVERGENCES

TOKENS, VOCAB, CHUNK = 256, 32768, 16  # one logits tensor: 32 MiB; one chunk: 2 MiB
# Temporaries of one chunk, in [CHUNK, VOCAB] float32 arrays: about 6 for the KLs, up to ~13 for JSD and
# the skew divergences (measured: 5 to 13.3); 16 leaves room without letting a full-size copy through.
CHUNK_ARRAYS = 16


def _peak_bytes_during(fn) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU while ``fn()`` runs, from the profiler's trace."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The chrome trace has one "[memory]" event per allocation (+bytes) and free (-bytes), in order.
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    assert memory, "the profiler recorded no allocation"
    current = peak = 0
    for event in memory:
        if event["args"].get("Device Type", 0) == 0:  # CPU
            current += event["args"]["Bytes"]
            peak = max(peak, current)
    return peak


def _forward_backward_peak(name: str, chunk_tokens: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(TOKENS, VOCAB, generator=g)
    student = torch.randn(TOKENS, VOCAB, generator=g).requires_grad_()
    mask = torch.ones(TOKENS, dtype=torch.bool)

    def run():
        DIVERGENCES[name](teacher, student, mask, chunk_tokens=chunk_tokens).backward()

    return _peak_bytes_during(run), teacher.numel() * teacher.element_size()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_divergence_peak_memory_stays_within_one_chunk(name):
    peak, input_bytes = _forward_backward_peak(name, CHUNK)
    chunk_bytes = CHUNK * VOCAB * 4
    bound = input_bytes + CHUNK_ARRAYS * chunk_bytes  # the student's gradient buffer + one chunk's temporaries
    assert peak <= bound, f"{name}: peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    # The gradient buffer itself is allocated (otherwise the measurement missed the allocations).
    assert peak >= input_bytes


def test_the_memory_measurement_sees_an_unchunked_computation():
    """With one chunk holding every token, the same measurement is far above the small-chunk bound: the
    bound above would catch an implementation that ignored ``chunk_tokens``."""
    peak, input_bytes = _forward_backward_peak("forward_kl", TOKENS)
    bound = input_bytes + CHUNK_ARRAYS * CHUNK * VOCAB * 4
    assert peak > 2 * bound
