"""Typed errors of the task families."""

from __future__ import annotations


class DatasetError(ValueError):
    """A task family's data is missing, unreadable, or too small for the spec.

    ``field`` is the spec field to fix (``task.path``, ``task.ways``, ...); the message starts with
    it, like pydantic's, so the API can answer 422 with the same shape as a validation error.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # keep the two-argument constructor picklable (Ray ships errors between processes)
        return (type(self), (self.field, self.detail))
