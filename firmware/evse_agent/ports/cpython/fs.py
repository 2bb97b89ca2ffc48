"""The agent's state directory on a Linux file system, with crash-safe replacement."""

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

    def write_atomic(self, name, data):
        target = self.path(name)
        temp = target + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
        self._sync_dir()

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
