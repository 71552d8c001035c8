"""Every error a node of the pack raises starts with the node and the input to change."""
from __future__ import annotations

import functools

from ..cache_core.errors import InputError, require_finite


def named_errors(node_title: str):
    """Decorate a node's `execute`: float inputs must be finite, and an `InputError` from any
    layer below comes out as "<node title>, <input>: <problem>"."""
    def decorate(execute):
        @functools.wraps(execute)
        def wrapper(cls, *args, **kwargs):
            try:
                for name, value in kwargs.items():
                    require_finite(name, value)
                return execute(cls, *args, **kwargs)
            except InputError as e:
                if e.node is not None:
                    raise                                    # already named by a node
                raise InputError(e.input_name, e.problem, node=node_title) from None
        return wrapper
    return decorate


__all__ = ["InputError", "named_errors"]
