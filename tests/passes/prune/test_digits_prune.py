"""On real data (scikit-learn digits): a CNN pruned to 50% of its channels and fine-tuned a few epochs
stays within 1.5 accuracy points of the dense model, and is really smaller."""

import copy

import torch

import slimfx
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.zoo import DigitsCNN


def test_digits_cnn_pruned_to_half_the_channels_keeps_accuracy():
    train, test = load_digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dense = train_classifier(DigitsCNN(), train, epochs=6, seed=0)
    dense_acc = accuracy(dense, test)
    before = copy.deepcopy(dense.state_dict())

    program = slimfx.trace(dense, (train.x[:8],))
    pruned = slimfx.run_pipeline(program, "prune-channels{sparsity=0.5,importance=l1}")
    layers = pruned.log[-1].stats["layers"]
    assert layers and all(kept <= total for kept, total in layers.values())
    assert pruned.num_params() < 0.4 * program.num_params()

    tuned = train_classifier(pruned.module, train, epochs=3, lr=1e-3, seed=1)
    pruned_acc = accuracy(tuned, test)
    assert dense_acc > 90.0
    assert pruned_acc >= dense_acc - 1.5, (dense_acc, pruned_acc)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # the user's model is untouched
