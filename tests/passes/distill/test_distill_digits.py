"""On real data (scikit-learn digits): knowledge distillation from a trained DigitsCNN teacher

1. makes a student with < 1/4 of the teacher's parameters better than the same student trained on labels alone
   (same trainer, epochs, data order and initialisation; only the objective differs: alpha=0 is labels only),
   averaged over 3 seeds;
2. brings a copy of the teacher pruned to 50% of its channels back to within 1 point of the teacher (KD with
   automatically paired stage features; the pruned stages have half the channels, so 1x1 conv adapters).
"""

import torch
import torch.nn as nn

import slimfx
from slimfx.datasets import accuracy, load_digits, train_classifier
from slimfx.passes.distill.trainer import distill
from slimfx.zoo import DigitsCNN

SEEDS = (0, 1, 2)


def tiny_cnn(seed: int) -> nn.Module:
    """~2k parameters: two 8-channel 3x3 convs, a 2x2 max-pool, a linear classifier."""
    with torch.random.fork_rng():
        torch.manual_seed(100 + seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
        )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())




def test_distillation_beats_labels_alone_and_recovers_a_pruned_teacher(one_thread):
    train, test = load_digits()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = train_classifier(DigitsCNN(), train, epochs=6, seed=0)
    teacher_acc = accuracy(teacher, test)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert _params(tiny_cnn(0)) <= _params(teacher) / 4

    common = dict(epochs=10, lr=1e-2, batch_size=64, progress=False)
    rows = {"labels only (alpha=0)": [], "KD logits (T=4, alpha=0.9)": [], "KD + auto features + attention": []}
    for seed in SEEDS:
        student = tiny_cnn(seed)
        rows["labels only (alpha=0)"].append(accuracy(distill(student, teacher, train, alpha=0.0, seed=seed,
                                                               **common), test))
        rows["KD logits (T=4, alpha=0.9)"].append(accuracy(distill(student, teacher, train, alpha=0.9,
                                                                    temperature=4.0, seed=seed, **common), test))
        rows["KD + auto features + attention"].append(accuracy(distill(
            student, teacher, train, alpha=0.9, temperature=4.0, feature_pairs="auto", attention_weight=1.0,
            seed=seed, **common), test))

    program = slimfx.trace(teacher, (train.x[:8],))
    pruned = slimfx.run_pipeline(program, "prune-channels{sparsity=0.5}")
    pruned_acc = accuracy(pruned.module, test)
    recovered = distill(pruned, teacher, train, epochs=15, lr=3e-3, alpha=0.5, temperature=4.0, feature_pairs="auto",
                        schedule="cosine", progress=False)
    recovered_acc = accuracy(recovered.module, test)

    mean = {name: sum(values) / len(values) for name, values in rows.items()}
    print(f"\nteacher DigitsCNN: {_params(teacher)} params, {teacher_acc:.2f}%")
    print(f"student tiny CNN: {_params(tiny_cnn(0))} params, 10 epochs, Adam lr 1e-2, seeds {SEEDS}")
    for name, values in rows.items():
        print(f"  {name:32s} " + "  ".join(f"{v:6.2f}" for v in values) + f"   mean {mean[name]:6.2f}")
    print(f"teacher pruned to 50% channels: {pruned.num_params()} params, {pruned_acc:.2f}% before, "
          f"{recovered_acc:.2f}% after 15 epochs of KD (T=4, alpha=0.5, auto feature pairs, cosine lr)")

    assert teacher_acc > 98.0
    assert mean["KD logits (T=4, alpha=0.9)"] > mean["labels only (alpha=0)"] + 0.5, mean
    assert mean["KD + auto features + attention"] > mean["labels only (alpha=0)"], mean
    assert pruned.num_params() < 0.4 * program.num_params()
    assert recovered_acc >= teacher_acc - 1.0, (teacher_acc, recovered_acc)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # teacher untouched
