"""The saved state of a data iterator: its position plus the settings the position is only meaningful under.

A run's checkpoint holds its data iterator's `get_state()` (JSON); on resume `set_state(state)` continues from it.
A position (a batch index, an epoch and cursor, grain's state) means the same thing only in an iterator built with
the same data and settings, so every iterator saves those settings beside its position and refuses, with one line
naming each difference, to continue under others.

    class MyIterator(SettingsCheckedState):
        resume_error = "cannot resume my data under different settings ({detail})"

        def __init__(self, ...):
            self.settings = {"seed": seed, "batch_size": batch_size}   # JSON values
            self.index = 0

        def position(self):
            return {"index": self.index}

        def restore_position(self, state):
            self.index = int(state["index"])
"""

from __future__ import annotations

from typing import Any


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The settings that differ, as `'key was <saved>, is <current>'` joined by '; ' (empty when none differ)."""
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return "; ".join(f"{k} was {saved.get(k)!r}, is {current.get(k)!r}" for k in changed)


class SettingsCheckedState:
    """`get_state` / `set_state` of an iterator whose state is `{"settings": ..., **position}`.

    A subclass sets `self.settings` (a JSON dict) and `resume_error` (a message with a `{detail}` field), and
    implements `position()` and `restore_position(state)`.
    """

    settings: dict[str, Any]
    resume_error: str = "cannot resume the data under different settings ({detail})"

    def position(self) -> dict[str, Any]:
        """The JSON fields that say where the iterator is."""
        raise NotImplementedError

    def restore_position(self, state: dict[str, Any]) -> None:
        """Go to the position `state` holds (its settings already checked)."""
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        return {"settings": self.settings, **self.position()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state`. Raises ValueError if it was saved under other data or settings."""
        detail = settings_changes(state.get("settings", {}), self.settings)
        if detail:
            raise ValueError(self.resume_error.format(detail=detail))
        self.restore_position(state)
