"""Shared test setup: no hub access, quiet logs, deterministic torch on the CPU."""

import os

# A hub call without network hangs for ~50 s before failing: make every load local-only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# Tiny models gain nothing from a second thread, and two busy processes with two OpenMP threads each
# on a 2-core machine slow each other down many times over (the tests start subprocesses).
torch.set_num_threads(1)

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_setting(tmp_path_factory):
    """Data, tokenizer and a trained tiny teacher for the engine tests (built once per test run)."""
    from engine_helpers import build_setting

    return build_setting(tmp_path_factory.mktemp("tiny_setting"))
