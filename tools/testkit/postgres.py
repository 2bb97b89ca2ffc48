"""A throwaway PostgreSQL cluster on a free loopback port, for the collector's tests.

Uses the server binaries of the system's PostgreSQL (Debian: the ``postgresql`` package,
``/usr/lib/postgresql/<version>/bin``). PostgreSQL refuses to run as root, so as root the
cluster runs as the unprivileged ``nobody`` (through ``runuser``) in a directory it owns.
"""

import glob
import os
import shutil
import subprocess
import tempfile

from .broker import free_port

SERVER_USER = "nobody"


def find_bin_dir():
    """Directory holding ``initdb`` and ``pg_ctl``; RuntimeError saying how to install them."""
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
                           "(Debian: apt-get install postgresql, or run `make test`, which does)")
    newest = max(candidates, key=lambda path: _version(path.split("/")[-3]))
    return os.path.dirname(newest)


def _version(text):
    return tuple(int(part) for part in text.split(".") if part.isdigit())


class PostgresCluster:
    """initdb + pg_ctl in a private directory; ``url`` connects as the superuser ``postgres``
    (trust authentication on 127.0.0.1 only). ``stop()`` ends it, ``close()`` removes it."""

    def __init__(self, port=None):
        self.bin_dir = find_bin_dir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self._dir = tempfile.mkdtemp(prefix="evse-postgres-")
        self.data_dir = os.path.join(self._dir, "data")
        self.log_path = os.path.join(self._dir, "server.log")
        self._as_user = []
        if os.geteuid() == 0:
            import pwd
            owner = pwd.getpwnam(SERVER_USER)
            os.chown(self._dir, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", SERVER_USER, "--"]
        os.chmod(self._dir, 0o700)

    @property
    def url(self):
        return "postgresql://%s@%s:%d/postgres" % (self.user, self.host, self.port)

    def _run(self, tool, *args):
        command = self._as_user + [os.path.join(self.bin_dir, tool)] + list(args)
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self._dir)
        if result.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (tool, result.returncode, result.stdout.strip()))
        return result.stdout

    def start(self):
        """Create the cluster (first time) and start the server; returns self."""
        if not os.path.exists(self.data_dir):
            self._run("initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        # No durability needed for a throwaway cluster: fsync off makes the tests fast.
        self._run("pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-w", "-t", "120", "-o",
                  "-p %d -k %s -c listen_addresses=%s -c fsync=off -c max_connections=50"
                  % (self.port, self._dir, self.host), "start")
        return self

    def stop(self):
        if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop")

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
