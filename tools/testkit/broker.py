"""A private mosquitto broker on a free loopback port, for the demo, tests and benchmarks."""

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time

SEARCH_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"


def find_mosquitto():
    """Path of the mosquitto binary; RuntimeError saying how to install it otherwise."""
    path = shutil.which("mosquitto", path=SEARCH_PATH)
    if path is None:
        raise RuntimeError("mosquitto not found: install it (Debian: apt-get install mosquitto, "
                           "or run `make test`, which does)")
    return path


def _mosquitto_passwd():
    path = shutil.which("mosquitto_passwd", path=SEARCH_PATH)
    if path is None:
        raise RuntimeError("mosquitto_passwd not found (it ships with the mosquitto package)")
    return path


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raise_fd_limit():
    """In the broker's process before exec: as many open files as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Mosquitto:
    """One mosquitto process owned by the caller: start, stop, kill and restart at will.

    The port stays the same across restarts, so clients reconnect to the same address.
    """

    def __init__(self, port=None, persistence=False, tls_files=None, users=None, bridge_to=None,
                 bridge_topics=("evse/# in 1",), acl=None, max_connections=None):
        """``tls_files``: (ca, cert, key) paths for a TLS listener; ``users``: {name: password}
        to require a login (anonymous clients are then refused); ``bridge_to``: another
        Mosquitto to bridge with, exchanging ``bridge_topics`` (mosquitto ``topic`` lines:
        ``in`` brings that broker's messages here, ``out`` sends ours there); ``acl``: the
        lines of a mosquitto ``acl_file`` (``user``, ``topic``, ``pattern``) to enforce;
        ``max_connections``: clients it accepts (the broker's open-file limit is raised to
        the hard limit when it starts, each client holding one descriptor)."""
        self.binary = find_mosquitto()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._dir = tempfile.mkdtemp(prefix="evse-mosquitto-")
        self.config_path = os.path.join(self._dir, "mosquitto.conf")
        self.log_path = os.path.join(self._dir, "mosquitto.log")
        with open(self.config_path, "w") as conf:
            conf.write("listener %d 127.0.0.1\n" % self.port)
            # A subscriber slower than a replay must not lose QoS 1 messages to mosquitto's
            # default queue of 1000 per client: the tests count every message.
            conf.write("max_queued_messages 1000000\n")
            if max_connections is not None:
                conf.write("max_connections %d\n" % max_connections)
            if os.geteuid() == 0:
                # Keep root's access to this private directory instead of dropping to "mosquitto".
                conf.write("user root\n")
            if tls_files is not None:
                ca_file, cert_file, key_file = tls_files
                conf.write("cafile %s\ncertfile %s\nkeyfile %s\n" % (ca_file, cert_file, key_file))
            if users:
                password_file = os.path.join(self._dir, "passwords")
                for number, (name, password) in enumerate(sorted(users.items())):
                    subprocess.run([_mosquitto_passwd(), "-b"] + (["-c"] if number == 0 else [])
                                   + [password_file, name, password], check=True)
                conf.write("allow_anonymous false\npassword_file %s\n" % password_file)
            if acl is not None:
                acl_file = os.path.join(self._dir, "acl")
                with open(acl_file, "w") as handle:
                    handle.write("\n".join(acl) + "\n")
                conf.write("acl_file %s\n" % acl_file)
            else:
                conf.write("allow_anonymous true\n")
            if bridge_to is not None:
                conf.write("connection bridge-%d\naddress %s:%d\n" % (bridge_to.port, bridge_to.host,
                                                                     bridge_to.port))
                for line in bridge_topics:
                    conf.write("topic %s\n" % line)
                # A persistent bridge session: what arrives while the link is down is kept.
                conf.write("cleansession false\nrestart_timeout 1\nnotifications false\n")
            conf.write("persistence %s\n" % ("true" if persistence else "false"))
            if persistence:
                conf.write("persistence_location %s/\n" % self._dir)
            conf.write("log_dest file %s\n" % self.log_path)
            # Subscriptions are logged so that tests can wait for one to be in place.
            conf.write("log_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\n")
        self.process = None

    def start(self, timeout_s=60):
        """Start the broker and wait until it accepts connections."""
        self.process = subprocess.Popen([self.binary, "-c", self.config_path], preexec_fn=_raise_fd_limit,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("mosquitto exited with %s: %s"
                                   % (self.process.returncode, self.process.stderr.read().decode()))
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not accept connections on port %d within %s s"
                           % (self.port, timeout_s))

    def subscriptions(self, client_id):
        """Topic filters ``client_id`` has subscribed to so far, in order, repeats included
        (from the broker's log: mosquitto handles a SUBSCRIBE before its next packet, so a
        filter listed here is in place for anything published from now on)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                lines = log.read().splitlines()
        except FileNotFoundError:
            return []
        prefix = "%s " % client_id
        found = []
        for line in lines:
            _, _, entry = line.partition(": ")
            if entry.startswith(prefix):
                parts = entry[len(prefix):].split(" ", 1)
                if len(parts) == 2 and parts[0] in ("0", "1", "2"):
                    found.append(parts[1])
        return found

    def kill(self):
        """Kill -9: a broker crash, no goodbye to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self):
        """Terminate cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self):
        self.kill()
        return self.start()

    def close(self):
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
