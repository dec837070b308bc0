"""Error messages as the command line prints them: one line.

    from fastat.utils.errors import one_line
    one_line(ValueError("no such  file"))    # the text, whitespace collapsed (also across lines)
    one_line(yaml_error, first_only=True)    # its first line only (what follows is context)

Used wherever an exception becomes a ``fastat: error: ...`` line or part of another message. The exit
codes of the command line live here too (the console script's guard needs them before anything loads).
"""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "listing", "one_line"]

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130  # the command line's exit codes


def one_line(e: BaseException | str, *, first_only: bool = False) -> str:
    """The message of ``e`` on one line: its text with the whitespace collapsed (``first_only``: its first
    non-blank line only, for messages whose later lines are context such as a YAML excerpt or a long
    compiler report), or the exception's type name when it has no text."""
    text = str(e)
    if first_only:
        text = next((ln for ln in text.splitlines() if ln.strip()), "")
    text = " ".join(text.split())
    return text or (type(e).__name__ if isinstance(e, BaseException) else "")


def listing(items, most: int = 10) -> str:
    """``items`` joined by commas for a message, the first ``most`` of them (`` ...`` when there are more)."""
    items = [str(i) for i in items]
    return ", ".join(items[:most]) + (" ..." if len(items) > most else "")
