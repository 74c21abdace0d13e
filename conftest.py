"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one intra-op thread for a module of many tiny ops: on a shared 2-core runner two threads made
    each small op 10-100x slower, one is steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
