"""The bundled demo training: a long-tailed classifier in numpy whose loss weights autotune-rt tunes.

Run it as ``python -m autotune_rt.demo.train [options]`` or as a file path. Every epoch it
hot-reloads the loss weights through :class:`autotune_rt.client.ConfigReloader` (unless
``--no_reload``), trains one epoch and prints the seed's metric line::

    Epoch 12[0.01s]: {'epoch': 12, 'ce': 1.2345, 'loss': 1.3456, 'acc1': 0.4567, ...}

``ce`` is the test cross-entropy, ``loss`` the weighted training loss of the epoch, ``acc1``
the accuracy on the balanced test set (the mean per-class accuracy), ``head_acc`` and
``tail_acc`` the mean accuracy of the most frequent and of the rarest third of the classes,
``best_metric`` the best ``acc1`` so far. Options it does not know (the seed's ``--task``,
``--model``, ...) are ignored, so the seed's command lines run it as they are.

The task: 24 Gaussian classes in 6 super-classes, class sizes falling exponentially from 600
to 6 (the CIFAR-LT profile), a balanced test set. The model: a linear softmax classifier
trained with mini-batch SGD (momentum, weight decay, gradient-norm clipping by
``max_grad_norm``). The loss is the weighted sum of

* ``lambda_dol``:  plain cross-entropy, which follows the training prior (favours the head);
* ``lambda_col``:  logit-adjusted cross-entropy on ``logits + tau * log(prior)`` (favours the tail);
* ``lambda_hier``: super-class cross-entropy on the summed fine probabilities (structure);
* ``lambda_scl``:  class-balanced cross-entropy with inverse-frequency weights (favours the
  tail; it stands in for the seed's supervised contrastive term).

With the seed's weights the run settles within about 15 epochs with good head and poor tail
accuracy (the seed's ``poor_tail``); raising ``lambda_col`` and ``lambda_scl`` lifts the
tail and the balanced accuracy within a few epochs. The weight decay keeps the logits small,
so the balance between the terms, not over-confident logits, decides where the class
boundaries fall. ``docs/demo-weights.md`` has the measured effect of each setting.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # The matrices are tiny: BLAS worker threads would only fight the supervisor for the same
    # few cores. This has to happen before numpy loads its BLAS.
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    if not __package__:
        # Run as a file path (python .../autotune_rt/demo/train.py): make the package importable.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from autotune_rt.client import ConfigReloader

__all__ = [
    "BIAS_LR_SCALE",
    "LOSS_WEIGHTS",
    "LossConstants",
    "Model",
    "Task",
    "build_parser",
    "evaluate",
    "loss_and_grad",
    "main",
    "make_task",
    "parse_args",
    "train",
]

Array = NDArray[np.float64]
IntArray = NDArray[np.int64]

# The names the seed tunes, in the seed's order.
LOSS_WEIGHTS = ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl", "max_grad_norm")

MOMENTUM = 0.9
# The class balance lives in the bias, whose gradient for a rare class is as small as the class
# is rare: a larger step lets the balance settle within a few epochs instead of a hundred, so
# the run plateaus, and answers a change of weights, on the time scale of a demo.
BIAS_LR_SCALE = 5.0
# Distance of the super-class centres from the origin, in units of the within-class noise:
# far enough that most confusions stay inside a super-class, close enough that some do not.
SUPER_RADIUS = 4.0


@dataclass(frozen=True)
class Task:
    """A generated long-tailed data set.

    Attributes:
        x_train: Training inputs, one row per sample.
        y_train: Training labels; class 0 is the most frequent.
        x_test: Balanced test inputs.
        y_test: Balanced test labels.
        super_of: The super-class of each class.
        counts: Training samples per class.
        head: Mask of the head classes (the most frequent third).
        tail: Mask of the tail classes (the rarest third).
    """

    x_train: Array
    y_train: IntArray
    x_test: Array
    y_test: IntArray
    super_of: IntArray
    counts: IntArray
    head: NDArray[np.bool_]
    tail: NDArray[np.bool_]


def _directions(rng: np.random.Generator, n: int, dim: int, *, orthogonal: bool = False) -> Array:
    """Return ``n`` random unit vectors in ``dim`` dimensions, mutually orthogonal when asked and n <= dim."""
    raw = rng.normal(size=(dim, n))
    if orthogonal and n <= dim:
        q, _ = np.linalg.qr(raw)
        return np.ascontiguousarray(q.T)
    return np.ascontiguousarray((raw / np.linalg.norm(raw, axis=0)).T)


def make_task(
    *,
    n_classes: int = 24,
    n_super: int = 6,
    dim: int = 8,
    max_per_class: int = 600,
    imbalance: float = 100.0,
    test_per_class: int = 100,
    class_sep: float = 1.9,
    seed: int = 0,
) -> Task:
    """Generate a long-tailed Gaussian classification task.

    Class ``c`` belongs to super-class ``c % n_super``, so every super-class mixes head and
    tail classes and the coarse loss cannot settle the head/tail balance. The classes of a
    super-class sit at the same distance ``class_sep`` from its centre along orthogonal
    directions, so a tail class competes with head classes on equal terms and the results
    vary little with the seed. The noise is unit Gaussian.

    Args:
        n_classes: Fine classes (at least 3).
        n_super: Super-classes.
        dim: Input dimension.
        max_per_class: Training samples of the largest class.
        imbalance: Largest over smallest class size.
        test_per_class: Test samples per class.
        class_sep: Distance of each class mean from its super-class centre; smaller is harder.
        seed: The same seed gives the same task.

    Returns:
        The task.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(n_classes) / max(n_classes - 1, 1)
    counts = np.maximum(2, np.round(max_per_class * imbalance ** (-ranks))).astype(np.int64)
    super_of = np.arange(n_classes, dtype=np.int64) % n_super
    centres = _directions(rng, n_super, dim) * SUPER_RADIUS
    means = np.empty((n_classes, dim))
    for s in range(n_super):
        members = np.flatnonzero(super_of == s)
        means[members] = centres[s] + _directions(rng, len(members), dim, orthogonal=True) * class_sep

    def sample(per_class: IntArray) -> tuple[Array, IntArray]:
        y = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
        return means[y] + rng.normal(size=(len(y), dim)), y

    x_train, y_train = sample(counts)
    x_test, y_test = sample(np.full(n_classes, test_per_class, dtype=np.int64))
    centre = x_train.mean(axis=0)
    x_train -= centre
    x_test -= centre
    third = np.arange(n_classes) * 3 // n_classes  # 0 head, 1 middle, 2 tail
    return Task(x_train, y_train, x_test, y_test, super_of, counts, third == 0, third == 2)


class Model:
    """A linear softmax classifier with an SGD-with-momentum optimiser."""

    def __init__(self, dim: int, bias: Array) -> None:
        """Start from zero weights (the loss is convex, so no random start is needed).

        Args:
            dim: Input dimension.
            bias: The initial bias, one per class.
        """
        self.weight: Array = np.zeros((dim, len(bias)))
        self.bias: Array = bias.copy()
        self._velocity = (np.zeros_like(self.weight), np.zeros_like(self.bias))

    def logits(self, x: Array) -> Array:
        """Return the logits of ``x``, shape (samples, classes)."""
        out: Array = x @ self.weight + self.bias
        return out

    def step(
        self, x: Array, grad_logits: Array, *, lr: float, max_grad_norm: float, weight_decay: float
    ) -> float:
        """Backpropagate a logit gradient, clip its global norm, and take one SGD step.

        The bias steps ``BIAS_LR_SCALE`` times further than the weights.

        Args:
            x: The batch inputs the logits came from.
            grad_logits: Gradient of the batch loss w.r.t. the logits.
            lr: Learning rate.
            max_grad_norm: Clipping bound on the global gradient norm.
            weight_decay: L2 coefficient on the weights (not on the bias, which carries the
                class prior).

        Returns:
            The gradient norm before clipping.
        """
        grads = (x.T @ grad_logits, grad_logits.sum(axis=0))
        norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in grads)))
        scale = max_grad_norm / norm if norm > max_grad_norm > 0 else 1.0
        v_weight, v_bias = self._velocity
        v_weight *= MOMENTUM
        v_weight += scale * grads[0] + weight_decay * self.weight
        v_bias *= MOMENTUM
        v_bias += scale * grads[1]
        self.weight -= lr * v_weight
        self.bias -= lr * BIAS_LR_SCALE * v_bias
        return norm


def _log_softmax(z: Array) -> Array:
    shifted = z - z.max(axis=1, keepdims=True)
    out: Array = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


@dataclass(frozen=True)
class LossConstants:
    """What the loss needs from the task, computed once per run.

    Attributes:
        log_prior: Log of the training class frequencies.
        class_weight: Inverse class frequencies (the class-balanced term's weights).
        super_of: The super-class of each class.
        tau: Strength of the logit adjustment.
    """

    log_prior: Array
    class_weight: Array
    super_of: IntArray
    tau: float = 1.0

    @classmethod
    def from_task(cls, task: Task, tau: float = 1.0) -> LossConstants:
        """Return the constants of ``task``."""
        counts = task.counts.astype(np.float64)
        return cls(np.log(counts / counts.sum()), 1.0 / counts, task.super_of, tau)


def loss_and_grad(
    logits: Array, y: IntArray, weights: dict[str, float], const: LossConstants
) -> tuple[float, Array]:
    """Return the weighted four-term loss of a batch and its gradient w.r.t. the logits.

    Args:
        logits: Batch logits, shape (batch, classes).
        y: Batch labels.
        weights: At least ``lambda_dol``, ``lambda_col``, ``lambda_hier`` and ``lambda_scl``.
        const: Per-task constants.

    Returns:
        ``(loss, gradient)``, both averaged over the batch.
    """
    n = len(y)
    rows = np.arange(n)
    onehot = np.zeros_like(logits)
    onehot[rows, y] = 1.0
    log_p = _log_softmax(logits)
    p = np.exp(log_p)
    ce = -log_p[rows, y]

    log_pa = _log_softmax(logits + const.tau * const.log_prior)
    col = -log_pa[rows, y].mean()
    grad_col = np.exp(log_pa) - onehot

    # -log of the true super-class's total probability; its gradient is p minus p
    # renormalised inside the true super-class.
    inside = np.where(const.super_of[None, :] == const.super_of[y][:, None], p, 0.0)
    mass = np.maximum(inside.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    hier = -np.log(mass).mean()
    grad_hier = p - inside / mass

    # Normalised by the batch's total weight, so the term keeps the scale of a mean.
    w = const.class_weight[y]
    w_norm = w / w.sum()
    scl = (w_norm * ce).sum()
    grad_scl = (p - onehot) * (w_norm * n)[:, None]

    loss = (
        weights["lambda_dol"] * ce.mean()
        + weights["lambda_col"] * col
        + weights["lambda_hier"] * hier
        + weights["lambda_scl"] * scl
    )
    grad = (
        weights["lambda_dol"] * (p - onehot)
        + weights["lambda_col"] * grad_col
        + weights["lambda_hier"] * grad_hier
        + weights["lambda_scl"] * grad_scl
    ) / n
    return float(loss), grad


def evaluate(model: Model, task: Task) -> dict[str, float]:
    """Return the test cross-entropy and the balanced, head and tail accuracy on the test set."""
    logits = model.logits(task.x_test)
    ce = -_log_softmax(logits)[np.arange(len(task.y_test)), task.y_test].mean()
    correct = (logits.argmax(axis=1) == task.y_test).astype(np.float64)
    n_classes = len(task.counts)
    per_class = np.bincount(task.y_test, weights=correct, minlength=n_classes) / np.bincount(
        task.y_test, minlength=n_classes
    )
    return {
        "ce": float(ce),
        "acc1": float(per_class.mean()),
        "head_acc": float(per_class[task.head].mean()),
        "tail_acc": float(per_class[task.tail].mean()),
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# (flag, type, default, help) of the options with a plain default.
_OPTIONS: tuple[tuple[str, Callable[[str], Any], Any, str], ...] = (
    ("--epochs", int, 60, "epochs to train"),
    ("--lambda_dol", float, 0.5, "weight of the plain cross-entropy"),
    ("--lambda_col", float, 0.3, "weight of the logit-adjusted cross-entropy"),
    ("--lambda_hier", float, 1.5, "weight of the super-class cross-entropy"),
    ("--lambda_scl", float, 0.2, "weight of the class-balanced cross-entropy"),
    ("--max_grad_norm", float, 1.0, "gradient-norm clipping bound, 0 for none"),
    ("--lr", float, 0.015, "SGD learning rate (momentum 0.9)"),
    ("--weight_decay", float, 0.02, "L2 coefficient on the weights"),
    ("--batch_size", _positive_int, 64, "mini-batch size"),
    ("--tau", float, 1.0, "strength of the logit adjustment"),
    ("--seed", int, 0, "seed of the task and of the batch order"),
    ("--n_classes", int, 24, "fine classes, at least 3"),
    ("--n_super", _positive_int, 6, "super-classes"),
    ("--dim", _positive_int, 8, "input dimension"),
    ("--max_per_class", _positive_int, 600, "training samples of the largest class"),
    ("--imbalance", float, 100.0, "largest over smallest class size"),
    ("--class_sep", float, 1.9, "class separation inside a super-class"),
    ("--test_per_class", _positive_int, 100, "test samples per class (the test set is balanced)"),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the demo's option parser; :func:`parse_args` also accepts options it does not know."""
    parser = argparse.ArgumentParser(
        prog="python -m autotune_rt.demo.train",
        description="A long-tailed classifier in numpy whose loss weights autotune-rt tunes. "
        "Options it does not know (the seed's --task, --model, ...) are ignored.",
        allow_abbrev=False,  # an unknown seed option must never be taken for an abbreviation
    )
    for flag, kind, default, text in _OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument(
        "--epoch_time", type=float, default=0.0, help="pad every epoch to at least this many seconds"
    )
    parser.add_argument(
        "--config_file", help="control file (default: $AUTOTUNE_CONFIG_FILE, else /tmp/auto_tune_config.json)"
    )
    parser.add_argument(
        "--no_reload", action="store_true", help="never read the control file: keep the weights fixed"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse the demo's options.

    Args:
        argv: The options; None reads ``sys.argv``.

    Returns:
        The options, and the arguments the demo does not know (to be ignored).
    """
    parser = build_parser()
    args, ignored = parser.parse_known_args(argv)
    if args.n_classes < 3 or args.n_super > args.n_classes:
        parser.error("--n_classes must be at least 3 and at least --n_super")
    if args.imbalance < 1:
        parser.error("--imbalance must be at least 1")
    return args, ignored


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def _print(line: str) -> None:
    print(line, flush=True)


def train(
    args: argparse.Namespace,
    *,
    reloader: ConfigReloader | None = None,
    emit: Callable[[str], None] = _print,
) -> list[dict[str, float]]:
    """Train the demo model and print one metric line per epoch.

    Args:
        args: Options from :func:`parse_args`. The loss weights are read from it at the start
            of every epoch, so whatever changes them changes the loss from then on; the
            model keeps its parameters.
        reloader: Applied to ``args`` before every epoch; None keeps the weights fixed.
        emit: Receives every line the demo prints.

    Returns:
        One record per epoch: the dict of its metric line.
    """
    task = make_task(
        n_classes=args.n_classes,
        n_super=args.n_super,
        dim=args.dim,
        max_per_class=args.max_per_class,
        imbalance=args.imbalance,
        test_per_class=args.test_per_class,
        class_sep=args.class_sep,
        seed=args.seed,
    )
    const = LossConstants.from_task(task, args.tau)
    # Starting from the log prior, as one does for imbalanced data, avoids an early peak of
    # balanced accuracy (zero biases are "balanced") that the run would then never beat.
    model = Model(args.dim, const.log_prior)
    rng = np.random.default_rng([args.seed, 1])
    emit(
        f"[demo] {len(task.counts)} classes in {args.n_super} super-classes; {len(task.y_train)} training "
        f"samples, {task.counts[0]} in the largest class and {task.counts[-1]} in the smallest; "
        f"balanced test set of {len(task.y_test)}. Weights: "
        + ", ".join(f"{k}={_fmt(getattr(args, k))}" for k in LOSS_WEIGHTS)
    )
    history: list[dict[str, float]] = []
    best = 0.0
    for epoch in range(args.epochs):
        started = time.perf_counter()
        if reloader is not None:
            changes = reloader.apply(args, epoch=epoch)
            if changes:
                moved = ", ".join(f"{k} {_fmt(old)}->{_fmt(new)}" for k, (old, new) in changes.items())
                emit(f"[demo] applied new weights at epoch {epoch}: {moved}")
        weights = {k: float(getattr(args, k)) for k in LOSS_WEIGHTS}
        order = rng.permutation(len(task.y_train))
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            x = task.x_train[batch]
            loss, grad = loss_and_grad(model.logits(x), task.y_train[batch], weights, const)
            model.step(
                x, grad, lr=args.lr, max_grad_norm=weights["max_grad_norm"], weight_decay=args.weight_decay
            )
            total += loss * len(batch)
        metrics = evaluate(model, task)
        best = max(best, metrics["acc1"])
        record: dict[str, float] = {
            "epoch": epoch,
            "ce": round(metrics["ce"], 4),
            "loss": round(total / len(order), 4),
            "acc1": round(metrics["acc1"], 4),
            "head_acc": round(metrics["head_acc"], 4),
            "tail_acc": round(metrics["tail_acc"], 4),
            "best_metric": round(best, 4),
        }
        history.append(record)
        if args.epoch_time > 0:
            time.sleep(max(0.0, args.epoch_time - (time.perf_counter() - started)))
        emit(f"Epoch {epoch}[{time.perf_counter() - started:.2f}s]: {record}")
    emit(f"Training finished, best_metric: {best:.4f}")
    return history


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line.

    Args:
        argv: The options; None reads ``sys.argv``.

    Returns:
        The exit status, 0.
    """
    args, ignored = parse_args(argv)
    if ignored:
        _print(f"[demo] ignoring options meant for another training: {' '.join(ignored)}")
    train(args, reloader=None if args.no_reload else ConfigReloader(args.config_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
