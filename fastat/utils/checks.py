"""Checks of a component's settings whose errors name the setting, so that a caller that knows it under
another name (a config key and its flag) can say that name instead.

    raise must("lam", "a finite number >= 0", lam)         # "lam must be a finite number >= 0, got -1"
    raise unknown("mode", mode, MODES)                     # "unknown mode 'x'; choose one of ddpm, ..."
    except SettingError as e: e.message("objective.lam (--lam)")   # the same text, the caller's name
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["SettingError", "is_number", "must", "unknown"]


class SettingError(ValueError):
    """A bad value of the setting ``setting`` (the owner's argument name). The first ``{name}`` in
    ``template`` is where the setting is named; ``str(e)`` names it ``display`` (default: ``setting``)."""

    def __init__(self, setting: str, template: str, display: str | None = None) -> None:
        self.setting = setting
        self._parts = template.split("{name}", 1)
        super().__init__((display or setting).join(self._parts))

    def message(self, name: str) -> str:
        """The message with the setting called ``name`` (prefixed ``name: `` if the text does not say it)."""
        if len(self._parts) == 1:
            return f"{name}: {self._parts[0]}"
        return name.join(self._parts)


def must(setting: str, what: str, value: Any, display: str | None = None) -> SettingError:
    """``<setting> must be <what>, got <value>``."""
    return SettingError(setting, f"{{name}} must be {what}, got {value!r}", display)


def unknown(setting: str, value: Any, choices: Iterable[str], display: str | None = None,
            also: str = "") -> SettingError:  # fmt: skip
    """``unknown <setting> <value>; choose one of <choices><also>``."""
    return SettingError(setting, f"unknown {{name}} {value!r}; choose one of {', '.join(choices)}{also}",
                        display)  # fmt: skip


def is_number(x: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
