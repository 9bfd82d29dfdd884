"""pytest: the tests import the project's modules from the checkout's root (as `python test_all.py` does)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tmp(tmp_path):
    """pytest's tmp_path (a fresh folder per test, kept for the last runs) as a str, as the command lines take it."""
    return str(tmp_path)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """One folder for the tiny checkpoints one run's tests share (test_sample.py's random_model, overfit_model,
    text_model: the overfit models train once a run; the editor's servers are cached by checkpoint path), as a str."""
    return str(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A file of random Inception weights in the published file's layout (test_fid.py's), shared by one run's tests."""
    import torch

    import fid
    from test_fid import _random_weights
    path = str(tmp_path_factory.mktemp("inception") / fid.WEIGHTS_FILE)
    torch.save(_random_weights(), path)
    return path
