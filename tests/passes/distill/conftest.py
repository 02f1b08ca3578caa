"""Shared by the distill tests: one intra-op thread, and a trained DigitsMLP teacher (trained once per
session, never mutated)."""

import pytest
import torch

from slimfx.datasets import load_digits, train_classifier
from slimfx.zoo import DigitsMLP


@pytest.fixture(scope="session")
def mlp_teacher():
    """(teacher, train, test): a DigitsMLP trained for 10 epochs (~96.7% test accuracy) and the flat digits
    splits. Trained with one intra-op thread, so its weights do not depend on the machine's core count."""
    train, test = load_digits(image=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            teacher = train_classifier(DigitsMLP(), train, epochs=10, seed=0)
    finally:
        torch.set_num_threads(threads)
    return teacher, train, test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: float results do not depend on the core count (the accuracy thresholds are met by
    a margin of a few test examples), and a busy 2-core machine runs these tests faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def digits(mlp_teacher):
    return mlp_teacher
