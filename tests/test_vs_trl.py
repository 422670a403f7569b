"""Side by side with TRL: okd's generalized JSD equals TRL's `GKDTrainer.generalized_jsd_loss`.

TRL is the optional extra `compare` (`pip install -c constraints-cpu.txt -e '.[compare]'`; `make test`
installs it). Same logits, same label mask, beta in {0, 0.1, 0.5, 0.9, 1}, endpoints included.
"""

from __future__ import annotations

import pytest
import torch

from okd.divergences import generalized_jsd

trl = pytest.importorskip("trl")


def _trl_loss():
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older TRL releases
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl(beta, temperature):
    generator = torch.Generator().manual_seed(int(beta * 10) + int(temperature))
    student = torch.randn(3, 7, 50, generator=generator) * 3
    teacher = torch.randn(3, 7, 50, generator=generator) * 3
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[2, 5:] = -100  # padding
    ours = generalized_jsd(teacher, student, labels != -100, beta=beta, temperature=temperature)
    theirs = _trl_loss()(student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)
