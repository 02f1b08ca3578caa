"""Shared by the distill tests: a trained DigitsMLP teacher (trained once per session, never mutated)."""

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
