"""Run a scenario under the MicroPython unix port with the core as deployed: a ROMFS image.

    micropython -X heapsize=BYTES romboot.py IMAGE SCRIPT [args...]

SCRIPT is a scenario (``harness.run``), or a program that runs when imported, with
``sys.argv`` = [SCRIPT, args...] (``tools/testkit/unix_board/run_agent.py``: the port's agent).

IMAGE is a ROMFS image of the compiled core (``mpremote romfs build``; tools/cli/mpy_build.py
``build_romfs``). A board maps its ROMFS partition from flash; this port has none, so the
image is read into one buffer allocated first, mounted with ``vfs.VfsRom`` at ``/rom`` and
imported from there (bytecode runs in place). What the scenario may use beyond the image is
the heap size minus the image. At the end one line goes to stderr::

    mpy-heap {"allocated_words": N, "loaded_words": L, "after_words": A, "image_bytes": B, "word_bytes": W}

in machine words, beyond the image: ``loaded_words`` in use once the scenario's code was
imported (``harness.mark_loaded``), ``after_words`` in use at the end, ``allocated_words``
from ``micropython.mem_peak()`` — on this port a count of every byte allocated, never
lowered by garbage collection, so allocation churn rather than a heap size. The heap a
scenario needs is found by running it at a fixed heap (``tools/testkit/mpy_unix.py --smallest``).
"""

import gc
import micropython
import sys
import vfs

WORD = 8 if sys.maxsize > (1 << 32) else 4


def mount(image):
    with open(image, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(0)
        data = bytearray(size)  # one allocation, the image's own bytes
        handle.readinto(data)
    vfs.mount(vfs.VfsRom(data), "/rom")
    return data


def main():
    if len(sys.argv) < 3:
        sys.stderr.write("usage: romboot.py IMAGE SCRIPT [args...]\n")
        sys.exit(2)
    image = mount(sys.argv[1])
    script = sys.argv[2]
    slash = script.rfind("/")
    folder, name = (script[:slash], script[slash + 1:]) if slash >= 0 else (".", script)
    sys.path[:] = [folder, "/rom", ".frozen"]
    try:
        import harness
    except ImportError:  # not a scenario: a program that runs on import (the host board's agent)
        harness = None
    else:
        harness.ARGV = sys.argv[2:]
    sys.argv[:] = sys.argv[2:]
    module = __import__(name[:-3] if name.endswith(".py") else name)
    if harness is None:
        return
    harness.run(module.main, report=False)
    gc.collect()
    sys.stderr.write('mpy-heap {"allocated_words": %d, "image_bytes": %d, "word_bytes": %d, "after_words": %d,'
                     ' "loaded_words": %d}\n'
                     % ((micropython.mem_peak() - len(image)) // WORD, len(image), WORD,
                        (gc.mem_alloc() - len(image)) // WORD, harness.loaded_words(len(image), WORD)))


main()
