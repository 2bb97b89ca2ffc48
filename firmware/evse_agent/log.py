"""Agent log: one place every module reports to; the port decides where lines go.

Keeps the last lines in a ring for the technician console. Portable (no ``logging``).
"""

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40

LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}

RING_SIZE = 100

_ring = []
_state = {"sink": None, "level": INFO}


def set_sink(sink, level=INFO):
    """Send log lines to ``sink(level, text)``; None keeps them only in the ring."""
    _state["sink"] = sink
    _state["level"] = level


def recent(n=RING_SIZE):
    """The last ``n`` (level, text) entries, oldest first."""
    return _ring[-n:] if n > 0 else []


def write(level, text):
    if level < _state["level"]:
        return
    _ring.append((level, text))
    if len(_ring) > RING_SIZE:
        del _ring[0]
    sink = _state["sink"]
    if sink is not None:
        sink(level, text)


def debug(text):
    write(DEBUG, text)


def info(text):
    write(INFO, text)


def warning(text):
    write(WARNING, text)


def error(text):
    write(ERROR, text)
