"""Fixtures shared by the layers tests."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """torch at two intra-op threads for the test (what splits the fused MoE path), the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
