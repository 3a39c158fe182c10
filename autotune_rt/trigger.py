"""When to diagnose: min_epochs, patience, cooldown and max_adjustments over a MetricTracker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotune_rt.exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from autotune_rt.tracker import MetricTracker

__all__ = ["Trigger"]


class Trigger:
    """Decide from a :class:`MetricTracker`'s counters whether to adjust the weights now.

    The trigger fires when all of these hold (checked in this order; the first that fails
    is what :meth:`reason_blocked` returns):

    ``max_adjustments``
        fewer than ``max_adjustments`` adjustments have been recorded;
    ``min_epochs``
        ``tracker.epochs_seen >= min_epochs`` (epochs observed, so with 0-based epochs and
        ``min_epochs=10`` epoch 9 is the first that may fire);
    ``cooldown``
        at least ``cooldown`` epochs were observed since the last adjustment (0 behaves
        as 1: never two adjustments in one epoch);
    ``patience``
        ``tracker.epochs_since_improvement >= patience``;
    ``no_metric``
        the current epoch has reported the optimised metric (``tracker.last_value`` is not
        None), so a decision waits for a validation line that follows the training line.

    The answer depends only on the tracker's counters and the adjustments recorded, so it
    may be asked after every line. See ``docs/trigger.md`` for worked examples.

    Attributes:
        min_epochs: Epochs to observe before the first adjustment.
        patience: Epochs without improvement that make a stall.
        cooldown: Epochs to observe after an adjustment before the next.
        max_adjustments: The most adjustments in the run; None for no limit.
        adjustments: Adjustments recorded so far.
    """

    def __init__(
        self,
        min_epochs: int = 10,
        patience: int = 5,
        cooldown: int | None = None,
        max_adjustments: int | None = None,
    ) -> None:
        """Create a trigger.

        Args:
            min_epochs: Epochs to observe before the first adjustment (>= 0).
            patience: Epochs without improvement that make a stall (>= 1).
            cooldown: Epochs to observe after an adjustment before the next (>= 0);
                None means ``patience``, so a new config gets a fair trial.
            max_adjustments: The most adjustments in the run (>= 0); None for no limit.

        Raises:
            ConfigError: A value is out of range.
        """
        _check("min_epochs", min_epochs, 0)
        _check("patience", patience, 1)
        if cooldown is not None:
            _check("cooldown", cooldown, 0)
        if max_adjustments is not None:
            _check("max_adjustments", max_adjustments, 0)
        self.min_epochs = min_epochs
        self.patience = patience
        self.cooldown = patience if cooldown is None else cooldown
        self.max_adjustments = max_adjustments
        self.adjustments = 0
        self._seen_at_adjustment: int | None = None

    def reason_blocked(self, tracker: MetricTracker) -> str | None:
        """Return why the trigger does not fire now, or None when it fires.

        Args:
            tracker: The run's tracker.

        Returns:
            ``"max_adjustments"``, ``"min_epochs"``, ``"cooldown"``, ``"patience"``,
            ``"no_metric"`` or None.
        """
        if self.max_adjustments is not None and self.adjustments >= self.max_adjustments:
            return "max_adjustments"
        if tracker.epochs_seen < self.min_epochs:
            return "min_epochs"
        # At most one adjustment per observed epoch, whatever the cooldown: a repeated line
        # of the epoch that fired must not fire again.
        if self._seen_at_adjustment is not None and (
            tracker.epochs_seen - self._seen_at_adjustment < max(self.cooldown, 1)
        ):
            return "cooldown"
        if tracker.epochs_since_improvement < self.patience:
            return "patience"
        if tracker.last_value is None:
            return "no_metric"
        return None

    def should_fire(self, tracker: MetricTracker) -> bool:
        """Return whether the weights should be adjusted now.

        Args:
            tracker: The run's tracker.
        """
        return self.reason_blocked(tracker) is None

    def record_adjustment(self, tracker: MetricTracker) -> None:
        """Note that an adjustment was made at the tracker's current epoch.

        Args:
            tracker: The run's tracker; its ``epochs_seen`` starts the cooldown.
        """
        self.adjustments += 1
        self._seen_at_adjustment = tracker.epochs_seen

    def __repr__(self) -> str:
        return (
            f"Trigger(min_epochs={self.min_epochs}, patience={self.patience}, "
            f"cooldown={self.cooldown}, max_adjustments={self.max_adjustments})"
        )


def _check(name: str, value: int, minimum: int) -> None:
    # bool is an int subclass; ``--patience True`` is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{name} must be a whole number (got {value!r})")
    if value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum} (got {value})")
