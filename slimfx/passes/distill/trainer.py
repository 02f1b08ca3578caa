"""distill(): train a student to imitate a teacher: soft labels + hard labels, optional feature and attention
losses through taps and adapters, per-epoch evaluation, early stopping, DDP and mixed precision (autocast).

Data order is a seeded permutation per epoch, identical on every rank; each global batch is split into
contiguous per-rank shards and each rank's loss is scaled by ``n_local * world / n_global``, so the
averaged gradients of DDP equal the single-process gradient of the same global batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from slimfx.errors import PassError
from slimfx.frontend.trace import trace
from slimfx.ir.meta import tensor_meta
from slimfx.ir.program import Program
from slimfx.passes.distill.adapters import make_adapters
from slimfx.passes.distill.losses import LossWeights, distill_loss
from slimfx.passes.distill.taps import add_taps, format_pairs, match_nodes, pair_stages, strip_taps

Pairs = Sequence[tuple[str, str]]
AMP_MODES = ("auto", "off", "bf16", "fp16")
"""Mixed-precision modes: auto (float16 on CUDA, off elsewhere), off, bf16 or fp16 autocast on any device."""


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The dtype the forward passes autocast to under ``amp`` on ``device``, or None for full precision.

    ``auto`` is float16 on CUDA (with gradient scaling) and off elsewhere; ``bf16`` / ``fp16`` are honoured
    on any device, so bf16 training can be tested (and used) on a CPU.
    """
    if amp not in AMP_MODES:
        raise PassError(f"distill: amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class LogitsOnly(nn.Module):
    """A view of a (possibly tapped) network that returns only its original output."""

    def __init__(self, net: nn.Module, tapped: bool):
        super().__init__()
        self.net = net
        self.tapped = tapped

    def forward(self, *inputs: Any) -> Any:
        out = self.net(*inputs)
        return out[0] if self.tapped else out


class _Student(nn.Module):
    """The trainable whole (student network + adapters), so DDP synchronises both."""

    def __init__(self, net: nn.Module, adapters: nn.ModuleList, names: list[str]):
        super().__init__()
        self.net = net
        self.adapters = adapters
        self.names = names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        out = self.net(x)
        if not self.names:
            return out, [], []
        logits, feats = out
        raw = [feats[name] for name in self.names]
        return logits, [a(f) for a, f in zip(self.adapters, raw)], raw


def labelled_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a ``Split`` or an ``(inputs, labels)`` tuple; PassError naming ``what`` otherwise."""
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    raise PassError(f"distill: {what} must be a Split (slimfx.datasets) or an (inputs, labels) tuple of tensors, "
                    f"got {type(data).__name__}")


def _as_program(model: nn.Module | Program, example: torch.Tensor, role: str) -> Program:
    if isinstance(model, Program):
        return model
    try:
        return trace(model, (example,), frontend="fx")
    except Exception as exc:
        raise PassError(f"distill: feature_pairs needs the {role} traced with torch.fx, which failed ({exc}); "
                        f"pass the {role} as a slimfx Program (slimfx.trace(..., frontend='export')) or use "
                        "feature_pairs=None") from exc


def _resolve_pairs(s_prog: Program, t_prog: Program, feature_pairs: str | Pairs) -> tuple[list, list]:
    if feature_pairs == "auto":
        pairs = pair_stages(s_prog, t_prog)
        if not pairs:
            raise PassError("distill: feature_pairs='auto' found no stages to pair (no 4-D activations of equal "
                            "spatial size, no final linear); give feature_pairs=[(student_node, teacher_node)] "
                            "or feature_pairs=None for logits only")
        return [s for s, _ in pairs], [t for _, t in pairs]
    s_nodes, t_nodes = [], []
    for index, pair in enumerate(feature_pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise PassError(f"distill: feature_pairs[{index}] must be a (student_pattern, teacher_pattern) pair, "
                            f"got {pair!r}")
        sides = ((s_prog, pair[0], "student", s_nodes), (t_prog, pair[1], "teacher", t_nodes))
        for program, pattern, role, out in sides:
            hits = match_nodes(program, [pattern], option=role)
            if len(hits) != 1:
                raise PassError(f"distill: feature_pairs[{index}] {role} pattern {pattern!r} matches "
                                f"{len(hits)} nodes ({', '.join(n.name for n in hits)}); make it match exactly one")
            out.append(hits[0])
    return s_nodes, t_nodes


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distill(
    student: nn.Module | Program,
    teacher: nn.Module | Program,
    train_data: Any,
    epochs: int = 10,
    lr: float = 1e-3,
    temperature: float = 4.0,
    alpha: float = 0.5,
    feature_pairs: str | Pairs | None = None,
    eval_data: Any = None,
    eval_fn: Callable[[nn.Module, Any], float] | None = None,
    patience: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    *,
    feature_weight: float = 1.0,
    feature_loss: str = "mse",
    attention_weight: float = 0.0,
    optimizer: str = "adam",
    schedule: str = "constant",
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    history: list[dict[str, float]] | None = None,
    amp: str = "auto",
) -> nn.Module | Program:
    """Train a copy of ``student`` against ``teacher`` and return it (same type as ``student``, in eval mode).

    Neither argument is mutated: the student is copied first, the teacher is copied and only run in eval
    mode without gradients. Loss: ``alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE(labels)``,
    plus ``feature_weight`` x feature_loss (mse | cosine) over adapted feature pairs and
    ``attention_weight`` x attention transfer over 4-D pairs. ``feature_pairs``: None (logits only),
    "auto" (:func:`pair_stages`) or [(student_pattern, teacher_pattern)] each matching one node; features
    of different shapes get learnable adapters (trained with the student, then discarded).

    train_data / eval_data: a ``Split`` or an ``(inputs, labels)`` tuple. ``eval_fn(model, eval_data)``
    returns a score where higher is better (default: top-1 accuracy); it runs after every epoch on the
    student in eval mode without gradients (a view returning only the original output), and the
    returned student has the weights of the best-scoring epoch. ``patience``: stop after that many epochs
    without improvement. ``optimizer``: adam | sgd (momentum 0.9); ``schedule``: constant | cosine (annealed
    to 0 over all steps). Deterministic for a seed (the global RNG is left as it was). Under an initialised
    torch.distributed process group the student is wrapped in DistributedDataParallel and every rank takes
    its shard of each global batch of ``batch_size``. ``amp`` (see :func:`autocast_dtype`): the forward
    passes run under autocast to float16 (with gradient scaling) or bfloat16 (no scaling needed: it has
    float32's exponent range); the weights, the optimizer state and the losses stay float32. ``history``,
    when given, gets one dict per epoch (loss, and score when evaluated).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise PassError(f"distill: epochs, batch_size and lr must be positive, got epochs={epochs}, "
                        f"batch_size={batch_size}, lr={lr}")
    if optimizer not in ("adam", "sgd"):
        raise PassError(f"distill: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if schedule not in ("constant", "cosine"):
        raise PassError(f"distill: schedule must be 'constant' or 'cosine', got {schedule!r}")
    if patience is not None and eval_data is None:
        raise PassError("distill: patience (early stopping) needs eval_data to score each epoch")
    if eval_fn is not None and eval_data is None:
        raise PassError("distill: eval_fn is given but eval_data is not; pass eval_data=... (what eval_fn scores)")
    if amp not in AMP_MODES:
        raise PassError(f"distill: amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    weights = LossWeights(temperature=temperature, alpha=alpha, feature=feature_weight, feature_loss=feature_loss,
                          attention=attention_weight)
    x, y = labelled_tensors(train_data, "train_data")
    rank, world = _world()
    if batch_size < world:
        raise PassError(f"distill: batch_size={batch_size} is the global batch; it must be >= the world size {world}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student_copy = student.clone() if isinstance(student, Program) else copy.deepcopy(student)
        teacher_copy = teacher.clone() if isinstance(teacher, Program) else copy.deepcopy(teacher)
        names: list[str] = []
        t_names: list[str] = []
        s_prog = None
        if feature_pairs is None:
            student_net = student_copy.module if isinstance(student_copy, Program) else student_copy
            teacher_net = teacher_copy.module if isinstance(teacher_copy, Program) else teacher_copy
            adapters = nn.ModuleList()
        else:
            example = x[:2]
            s_prog = _as_program(student_copy, example, "student")
            t_prog = _as_program(teacher_copy, example, "teacher")
            s_nodes, t_nodes = _resolve_pairs(s_prog, t_prog, feature_pairs)
            if progress and rank == 0:
                tqdm.write("distill: feature pairs\n" + format_pairs(list(zip(s_nodes, t_nodes))))
            shapes = [(tensor_meta(s).shape, tensor_meta(t).shape) for s, t in zip(s_nodes, t_nodes)]
            adapters = make_adapters(shapes, [f"{s.name}->{t.name}" for s, t in zip(s_nodes, t_nodes)])
            names, t_names = [s.name for s in s_nodes], [t.name for t in t_nodes]
            add_taps(s_prog, s_nodes, "student")
            add_taps(t_prog, t_nodes, "teacher")
            student_net, teacher_net = s_prog.module, t_prog.module

        if device is None:
            first = next(student_net.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        model = _Student(student_net, adapters, names).to(device)
        teacher_net = teacher_net.to(device).eval()
        for p in teacher_net.parameters():
            p.requires_grad_(False)
        trainable = model
        if world > 1:
            ddp_devices = [device] if device.type == "cuda" else None
            trainable = nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices)
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        amp_dtype = autocast_dtype(amp, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        autocast = nullcontext if amp_dtype is None else partial(torch.autocast, device.type, dtype=amp_dtype)
        if eval_data is not None and eval_fn is None:
            from slimfx.datasets import accuracy as eval_fn  # noqa: N813 (the default score)

        order_gen = torch.Generator().manual_seed(seed)
        n = len(y)
        steps = (n + batch_size - 1) // batch_size
        lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps) if schedule == "cosine" else None
        bar = tqdm(total=epochs * steps, desc="distill", unit="batch", disable=not progress or rank != 0)
        best_score, best_state, since_best = None, None, 0
        view = LogitsOnly(student_net, bool(names))
        try:
            for epoch in range(epochs):
                model.train()
                order = torch.randperm(n, generator=order_gen)
                total, count = 0.0, 0
                for start in range(0, n, batch_size):
                    index = order[start:start + batch_size]
                    if len(index) < world:  # a tail smaller than the world cannot be sharded
                        bar.update(1)
                        continue
                    shard = torch.tensor_split(index, world)[rank]
                    xb, yb = x[shard].to(device), y[shard].to(device)
                    with autocast():
                        with torch.no_grad():
                            t_out = teacher_net(xb)
                        logits, adapted, raw = trainable(xb)
                        if names:
                            t_logits, t_feats = t_out
                            t_list = [t_feats[name] for name in t_names]
                        else:
                            t_logits, t_list = t_out, []
                        loss, _ = distill_loss(logits.float(), t_logits.float(), yb,
                                               [(a.float(), t.float()) for a, t in zip(adapted, t_list)],
                                               [(r.float(), t.float()) for r, t in zip(raw, t_list)], weights)
                        scaled = loss * (len(shard) * world / len(index))
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(scaled).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        scaled.backward()
                        opt.step()
                    if lr_schedule is not None:
                        lr_schedule.step()
                    total += float(loss.detach()) * len(shard)
                    count += len(shard)
                    bar.update(1)
                record = {"epoch": epoch, "loss": total / max(count, 1)}
                if eval_data is not None:
                    view.eval()
                    with torch.no_grad():
                        score = float(eval_fn(view, eval_data))
                    record["score"] = score
                    if best_score is None or score > best_score:
                        best_score, since_best = score, 0
                        best_state = copy.deepcopy(student_net.state_dict())
                    else:
                        since_best += 1
                    bar.set_postfix(loss=f"{record['loss']:.4f}", score=f"{score:.2f}")
                else:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if history is not None:
                    history.append(record)
                if patience is not None and since_best >= patience:
                    break
        finally:
            bar.close()
        if best_state is not None:
            student_net.load_state_dict(best_state)

    return _finish(student_copy, s_prog, student_net)


def _finish(student_copy: nn.Module | Program, s_prog: Program | None, student_net: nn.Module) -> nn.Module | Program:
    """The trained student without taps, as the type the caller gave."""
    if s_prog is None:
        (student_copy.module if isinstance(student_copy, Program) else student_copy).eval()
        return student_copy
    strip_taps(s_prog)
    if isinstance(student_copy, Program):
        s_prog.module.eval()
        return s_prog
    result = student_copy.load_state_dict(student_net.state_dict(), strict=False)
    if result.unexpected_keys:
        raise PassError(f"distill: trained weights {result.unexpected_keys[:5]} have no place in the student "
                        "module; pass the student as a slimfx Program to get the trained graph instead")
    return student_copy.eval()
