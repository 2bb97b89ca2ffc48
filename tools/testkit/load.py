"""Run a command while the machine is busy: CPU-bound and disk-bound workers around it.

``python -m evse_tools.testkit.load [--cpu 2] [--disk 1] [--runs 3] [--max-s 5400] -- COMMAND...``
starts the workers, runs COMMAND up to ``--runs`` times in a row (stopping at the first
failure), then stops the workers and exits with COMMAND's last exit code. The workers stop
with it on success, failure, Ctrl-C or SIGTERM, stop by themselves when this process is gone,
and ``--max-s`` bounds the whole run (COMMAND is then ended, exit code 124).

A CPU worker spins in pure Python; a disk worker rewrites a 64 MiB file in 1 MiB chunks,
fsync'ing each, in a private temporary directory removed at the end. Each run's duration is
printed, so the same command with ``--cpu 0 --disk 0`` gives the unloaded figure.
"""

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

DISK_FILE_BYTES = 64 * 1024 * 1024
DISK_CHUNK_BYTES = 1024 * 1024


def _orphaned(parent_pid):
    return os.getppid() != parent_pid


def _worker_signals():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def cpu_worker(parent_pid):
    """Spin until the parent is gone (or this process is terminated)."""
    _worker_signals()
    spins = 0
    while True:
        spins += 1
        if spins % 1000000 == 0 and _orphaned(parent_pid):
            return


def disk_worker(parent_pid, directory):
    """Rewrite one file in fsync'ed chunks until the parent is gone."""
    _worker_signals()
    chunk = os.urandom(DISK_CHUNK_BYTES)
    path = os.path.join(directory, "load-%d.bin" % os.getpid())
    while not _orphaned(parent_pid):
        with open(path, "wb") as out:
            for _ in range(DISK_FILE_BYTES // DISK_CHUNK_BYTES):
                out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                if _orphaned(parent_pid):
                    break
        os.unlink(path)


class Load:
    """The worker processes; a context manager that always stops them and removes their files."""

    def __init__(self, cpu, disk):
        self.cpu = cpu
        self.disk = disk
        self.workers = []
        self.directory = None

    def __enter__(self):
        self.directory = tempfile.mkdtemp(prefix="evse-load-")
        me = os.getpid()
        for _ in range(self.cpu):
            self.workers.append(multiprocessing.Process(target=cpu_worker, args=(me,), daemon=True))
        for _ in range(self.disk):
            self.workers.append(multiprocessing.Process(target=disk_worker, args=(me, self.directory),
                                                        daemon=True))
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc):
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def run_command(command, deadline):
    """Run ``command`` in its own process group; end the group if the deadline passes or we
    are stopped. Returns the exit code (124 past the deadline)."""
    child = subprocess.Popen(command, start_new_session=True)
    try:
        while True:
            try:
                return child.wait(max(0.0, min(5.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    print("load: over the time bound, ending the command", file=sys.stderr)
                    _end_group(child)
                    return 124
    except BaseException:
        _end_group(child)
        raise


def _end_group(child):
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if child.poll() is not None:
            return
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", type=int, default=2, help="CPU-bound workers (default 2)")
    parser.add_argument("--disk", type=int, default=1, help="disk-bound workers (default 1)")
    parser.add_argument("--runs", type=int, default=1, help="run the command this many times in a row")
    parser.add_argument("--max-s", type=float, default=5400.0, help="bound on the whole run, seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.cpu < 0 or args.disk < 0 or args.runs < 1 or args.max_s <= 0:
        parser.error("--cpu and --disk must be >= 0, --runs >= 1, --max-s > 0")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    deadline = time.monotonic() + args.max_s
    code = 0
    try:
        with Load(args.cpu, args.disk):
            print("load: %d CPU-bound and %d disk-bound workers running" % (args.cpu, args.disk),
                  file=sys.stderr, flush=True)
            for run in range(1, args.runs + 1):
                started = time.monotonic()
                code = run_command(command, deadline)
                print("load: run %d/%d exited %d after %.0f s"
                      % (run, args.runs, code, time.monotonic() - started), file=sys.stderr, flush=True)
                if code != 0:
                    break
    except (KeyboardInterrupt, _Stop):
        print("load: interrupted, workers stopped", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
