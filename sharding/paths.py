"""Key paths of parameter trees as text: the one path formatter of the project.

`path_str` gives the dotted parameter path (`stack.blocks.0.attn.wq_a`) used by the model's parameter table,
the sharding rules, the optimizer and the tools; `path_keys` gives every entry, the nested names a checkpoint
stores on disk. It lives here, below the model, so that this package never depends on the model.
"""

from __future__ import annotations

from collections.abc import Iterable


def key_name(entry) -> str:
    """One entry of a key path as text: a dict key, an attribute name, a sequence index, or the entry itself
    (nnx flat-state paths hold plain strings and integers)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_keys(path: Iterable) -> list[str]:
    """Every entry of a key path as text, nothing dropped: the nested names a checkpoint stores on disk
    (e.g. ["params", "stack", "blocks", "0", "attn", "wq_a", "value"])."""
    return [key_name(k) for k in path]


def path_str(path: Iterable) -> str:
    """A key path (jax tree path or nnx flat-state path) as the dotted parameter path `stack.blocks.0.attn.wq_a`;
    a trailing `value` (the array inside an `nnx.Variable`) is dropped."""
    parts = path_keys(path)
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)
