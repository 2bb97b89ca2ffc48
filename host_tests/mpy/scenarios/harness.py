"""The scenarios' side of the MicroPython runner (``tools/testkit/mpy_run.mjs``); runs on both.

A scenario is a script that defines ``async def main()`` and ends with::

    if __name__ == "__main__":
        harness.run(main)

``emit(name, value)`` prints one result line (``name <json>``): the test compares the lines
MicroPython printed with the lines CPython printed for the same script. ``checkpoint()``
marks the end of one step: under MicroPython it samples ``gc.mem_alloc()`` after letting the
garbage collector run (the WebAssembly port collects only when control is back in
JavaScript, which an ``await asyncio.sleep(0)`` gives it).
"""

import asyncio
import gc
import json
import sys

MICROPYTHON = sys.implementation.name == "micropython"
DEFERRED = False  # set by tools/testkit/mpy_run.mjs: it awaits main() itself
ARGV = sys.argv if hasattr(sys, "argv") else []  # the runner sets it where sys.argv is missing

_state = {"main": None, "steps": 0, "peak": 0, "peak_step": None, "baseline": None}


def emit(name, value):
    """One result line; values are JSON (ints, strings, lists, dicts with sorted keys).

    Written piece by piece (streamed): the harness never builds the whole line, so it is
    not the largest allocation of a scenario run on a fixed heap."""
    write = sys.stdout.write
    write(name)
    write(" ")
    _write(value, write)
    write("\n")


def _write(value, write):
    if isinstance(value, dict):
        write("{")
        first = True
        for key in sorted(value):
            if not first:
                write(",")
            first = False
            write(json.dumps(key))
            write(":")
            _write(value[key], write)
        write("}")
    elif isinstance(value, (list, tuple)):
        write("[")
        for i, item in enumerate(value):
            if i:
                write(",")
            _write(item, write)
        write("]")
    elif isinstance(value, str):
        # MicroPython's json.dumps writes non-ASCII characters as they are; CPython escapes them.
        text = json.dumps(value)
        for c in text:
            if ord(c) >= 128:
                text = "".join(c if ord(c) < 128 else "\\u%04x" % ord(c) for c in text)
                break
        write(text)
    else:
        write(json.dumps(value))


def mem_alloc():
    return gc.mem_alloc() if MICROPYTHON else 0


async def checkpoint(label=None):
    """End of one step: collect garbage, then sample the heap in use."""
    await asyncio.sleep(0)
    gc.collect()
    _state["steps"] += 1
    if MICROPYTHON:
        used = gc.mem_alloc()
        if _state["baseline"] is None:
            _state["baseline"] = used
        if used > _state["peak"]:
            _state["peak"] = used
            _state["peak_step"] = label or _state["steps"]


def stats_json():
    """The heap figures for the runner: steps, baseline (after imports) and peak in use."""
    return json.dumps({"steps": _state["steps"], "baseline": _state["baseline"],
                       "peak": _state["peak"], "peak_step": _state["peak_step"],
                       "free": _state.get("free")})


def run(main, report=True):
    """Run the scenario: asyncio.run where the port has it; the runner awaits it otherwise.
    ``report``: write the checkpoint figures to stderr (romboot.py reports its own)."""
    if DEFERRED:
        _state["main"] = main
        return
    asyncio.run(main())
    if MICROPYTHON and report:
        sys.stderr.write("mpy-heap %s\n" % stats_json())


def loaded_words(image_bytes, word_bytes):
    """Heap in use once the code was loaded (``mark_loaded``), beyond the image, in words."""
    baseline = _state["baseline"]
    return -1 if baseline is None else (baseline - image_bytes) // word_bytes


async def finish():
    main = _state["main"]
    if main is not None:
        _state["main"] = None
        await main()


def workdir(name):
    """A fresh directory for the scenario's files: under the first argument, else /tmp."""
    base = ARGV[1] if len(ARGV) > 1 else "/tmp"
    path = base.rstrip("/") + "/" + name
    import os
    try:
        os.mkdir(path)
    except OSError:
        pass
    return path


def mark_loaded():
    """The code is loaded: note the heap in use and free from here on (after a collection).

    On a port with a fixed heap (the unix port's ``-X heapsize``) ``free`` is what the
    scenario's data may use; the test picks the heap size that leaves the budget free, so
    the code stays below it (a board keeps frozen code in flash) and the data above it gets
    the budget, in one piece as on a freshly booted board."""
    if MICROPYTHON:
        gc.collect()
        _state["baseline"] = gc.mem_alloc()
        _state["free"] = gc.mem_free()


def port_fs(root):
    """This platform's file system object: the MicroPython port's, or the CPython port's."""
    if MICROPYTHON:
        from evse_agent.ports.micropython.fs import FileSystem
    else:
        from evse_agent.ports.cpython.fs import FileSystem
    return FileSystem(root)
