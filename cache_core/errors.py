"""One error type for bad input, so every layer can name the input it blames.

Lower layers raise `InputError(input_name, problem)`; the node layer (`nodes/errors.py`) adds
the node's name in front, so the message a user sees starts with what to change.
"""
from __future__ import annotations

import math


class InputError(ValueError):
    """A value a user gave is unusable. `input_name` names it (dotted for a schedule's field,
    e.g. "schedule.causal_block_size"); `problem` says what is wrong and how to fix it."""

    def __init__(self, input_name: str, problem: str, node: str | None = None):
        self.input_name, self.problem, self.node = input_name, problem, node
        super().__init__(f"{node}, {input_name}: {problem}" if node else f"{input_name}: {problem}")


def require_finite(input_name: str, value) -> None:
    """NaN and infinities pass ComfyUI's min/max checks (every comparison is False): refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(input_name, f"is {value}; enter a finite number")


class ModelFamilyError(InputError):
    """The MODEL input is not one the pack can serve; the message says what it is instead."""

    def __init__(self, problem: str):
        super().__init__("model", problem)
