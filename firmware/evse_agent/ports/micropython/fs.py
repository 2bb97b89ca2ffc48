"""A directory of the agent's on MicroPython's VFS (littlefs on a board): state and journal.

The core's file system object (contract: ``ports/__init__.py``), with only what MicroPython
offers: ``open``, ``os.listdir``, ``os.rename``, ``os.remove``, ``os.stat``.

- Atomic replace: write ``<name>.tmp``, flush, close, rename over the old file. On littlefs
  a rename is atomic and a closed file is committed (littlefs is copy-on-write: a power cut
  leaves the old or the new file, never a torn one).
- ``sync_file``: ``flush()`` — on littlefs this is ``lfs_file_sync``, which commits the
  file's data and metadata; ``sync_dir`` has nothing to do.
- ``truncate``: MicroPython files have no ``truncate()``, so the kept part is copied in
  chunks to a temporary file that replaces the original (only ever done on recovery).
- A missing file is told from other errors by looking for it (errno numbers differ between
  ports: the WebAssembly port reports Emscripten's, e.g. 44 for ENOENT).
- Reads of a whole file go through one buffer: keep journal segments small on a board
  (``journal.segment_bytes``; the ESP32 board files use 8 KiB).
"""

import os

CHUNK = 1024


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def makedirs(path):
    """mkdir -p (MicroPython has no os.makedirs)."""
    built = "/" if path.startswith("/") else ""
    for part in path.split("/"):
        if not part:
            continue
        built = built + part if built in ("", "/") else built + "/" + part
        if not _exists(built):
            os.mkdir(built)


class FileSystem:
    """Files under ``root``: atomic replace by rename, appends committed by flush."""

    read_chunk = 2048  # the journal reads segments in pieces of this size (see journal._frames)

    def __init__(self, root):
        self.root = root.rstrip("/") or "/"
        makedirs(self.root)

    def path(self, name):
        return self.root + "/" + name if self.root != "/" else "/" + name

    def read(self, name):
        try:
            with open(self.path(name), "rb") as handle:
                return handle.read()
        except OSError:
            if _exists(self.path(name)):
                raise
            return None

    def read_from(self, name, offset, size=-1):
        """Up to ``size`` bytes of the file from ``offset`` (to its end if -1; b"" if missing)."""
        try:
            with open(self.path(name), "rb") as handle:
                handle.seek(offset)
                return handle.read() if size < 0 else handle.read(size)
        except OSError:
            if _exists(self.path(name)):
                raise
            return b""

    def write_atomic(self, name, data):
        target = self.path(name)
        temp = target + ".tmp"
        with open(temp, "wb") as handle:
            view = memoryview(data)
            written = 0
            while written < len(view):
                count = handle.write(view[written:written + CHUNK])
                written += count if count else 0
                if not count:
                    raise OSError("short write to %s" % temp)
            handle.flush()
        os.rename(temp, target)

    def listdir(self):
        return [name for name in os.listdir(self.root)]

    def size(self, name):
        return os.stat(self.path(name))[6]

    def open_append(self, name):
        return open(self.path(name), "ab")

    def open_read(self, name):
        return open(self.path(name), "rb")

    def sync_file(self, handle):
        handle.flush()

    def truncate(self, name, size):
        source = self.path(name)
        temp = source + ".tmp"
        with open(source, "rb") as original:
            with open(temp, "wb") as copy:
                left = size
                while left > 0:
                    chunk = original.read(CHUNK if left > CHUNK else left)
                    if not chunk:
                        break
                    copy.write(chunk)
                    left -= len(chunk)
                copy.flush()
        os.rename(temp, source)

    def rename(self, old, new):
        os.rename(self.path(old), self.path(new))

    def sync_dir(self):
        pass

    def free_bytes(self):
        stat = os.statvfs(self.root)
        return stat[0] * stat[4]

    def remove(self, name):
        try:
            os.remove(self.path(name))
        except OSError:
            if _exists(self.path(name)):
                raise

