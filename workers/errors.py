"""Every error type of the workers, in one module.

Two families. Input errors (:class:`SpecError` and its subclasses) name the spec field to fix in
``.field``, so the control plane answers 422 with that field without parsing messages. Run errors
(:class:`TrainingError`, :class:`WorkerError`, :class:`WorkerLost`, :class:`NonFiniteLossError`)
end or restart a run; the training loop and the worker group raise them typed, with their cause.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that is valid on its own but cannot run here; ``field`` names what to change.

    The message starts with the field, like pydantic's (``task.ways: 30 ways but 20 classes``).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # keep the two-argument constructor picklable (Ray ships errors between processes)
        return (type(self), (self.field, self.detail))


class DatasetError(SpecError):
    """A task family's data is missing, unreadable, or too small for the spec."""


class ModelError(SpecError):
    """A model spec that cannot be built (unknown, not allow-listed, refuses its inputs)."""


class NonFiniteLossError(FloatingPointError):
    """A loss (or a policy's log-probability) became NaN or infinite: stop rather than corrupt the parameters."""


class WorkerError(RuntimeError):
    """A worker failed computing its share; the message carries the cause. Not retried."""


class WorkerLost(WorkerError):
    """A worker process died (killed, out of memory, node lost): its group can be restarted."""


class TrainingError(RuntimeError):
    """Training stopped on an error; ``iteration`` is the meta-iteration that failed."""

    def __init__(self, message: str, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration

    def __reduce__(self):
        return (type(self), (str(self), self.iteration))


class Stopped(RuntimeError):
    """A computation's ``should_stop()`` said so between two steps (a time limit, a client gone);
    ``step`` is how many steps were done."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after {step} steps")
        self.step = step

    def __reduce__(self):
        return (type(self), (self.step,))
