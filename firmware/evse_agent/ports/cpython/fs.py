"""A directory of the agent's on a Linux file system: state files and journal segments.

The core's file system object (contract: ``ports/__init__.py``): whole-file reads,
crash-safe replacement, appends with fsync, truncation — all relative to one root directory.
"""

import os


class FileSystem:
    """Files under ``root``: atomic replace (temp + fsync + rename + directory fsync)."""

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, name):
        return os.path.join(self.root, name)

    def read(self, name):
        try:
            with open(self.path(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read_from(self, name, offset, size=-1):
        """Up to ``size`` bytes of the file from ``offset`` (all to its end if -1; b"" if missing)."""
        try:
            with open(self.path(name), "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        except FileNotFoundError:
            return b""

    def write_atomic(self, name, data):
        replace_file(self.path(name), data)

    def listdir(self):
        return os.listdir(self.root)

    def size(self, name):
        return os.path.getsize(self.path(name))

    def open_append(self, name):
        return open(self.path(name), "ab")

    def open_read(self, name):
        return open(self.path(name), "rb")

    def sync_file(self, handle):
        handle.flush()
        os.fsync(handle.fileno())

    def truncate(self, name, size):
        with open(self.path(name), "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())

    def rename(self, old, new):
        os.replace(self.path(old), self.path(new))

    def sync_dir(self):
        self._sync_dir()

    def free_bytes(self):
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def remove(self, name):
        try:
            os.remove(self.path(name))
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self):
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_file(path, data, mode=0o600):
    """Replace ``path`` with ``data`` crash-safely: temp file, fsync, rename, directory fsync."""
    temp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
