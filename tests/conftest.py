"""Shared fixtures: tiny models, data and trainers (CPU, no logger unless asked)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

# Type-checked by tests/test_typing.py, never imported: importing them would pull in both Lightning
# namespaces at collection.
collect_ignore_glob = ["typing/*"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on tiny tensors more only contend (4x slower on a shared 2-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

# ---------------------------------------------------------------------------- hypothesis profiles
# "default": small and reproducible (CI); "long": HYPOTHESIS_PROFILE=long for a deeper search.
try:
    from hypothesis import settings as _hyp_settings
except ImportError:  # hypothesis is only needed by tests/test_properties.py
    pass
else:
    _hyp_settings.register_profile("default", max_examples=40, deadline=None, derandomize=True)
    _hyp_settings.register_profile("long", max_examples=500, deadline=None)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
