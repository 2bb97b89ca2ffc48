"""``evse-agent``: run the agent on a Linux controller (or the host simulator board).

Usage: ``evse-agent --board boards/sim.json [--set meter.port=/dev/pts/3] [--duration 30]``;
``evse-agent --pin-hash 1234`` prints the ``console.pin_hash`` for a console PIN.
"""

import argparse
import asyncio
import os
import signal
import sys
import time

from ... import __version__, log
from ...config import ConfigError, load_board
from ...console import pin_hash
from ...messages import Topics, iso_utc
from ...reading import summary_line
from ...station import Ports, build_station
from .clock import SystemClock
from .console_port import BoardFile, open_console
from .fs import FileSystem
from .mqtt import MqttPublisher
from .serial_link import SerialStream
from .signer import FileKeySigner


def load_config(board_path, overrides):
    """The validated board config with ``section.field=value`` overrides applied."""
    config = load_board(board_path, overrides=overrides)
    try:
        check_files(config)
    except ConfigError as error:
        raise ConfigError("%s: %s" % (board_path, error))
    return config


def check_files(config):
    """Files the board names that must already exist and be readable on this controller
    (checked before anything is created on disk)."""
    tls = config["mqtt"]["tls"]
    needed = []
    if tls["enabled"]:
        needed += [("mqtt.tls.ca_file", tls["ca_file"]), ("mqtt.tls.cert_file", tls["cert_file"]),
                   ("mqtt.tls.key_file", tls["key_file"])]
    for setting, path in needed:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise ConfigError("%s: cannot read %s (%s)" % (setting, path, error.strerror or error))


def _stderr_sink(level, text):
    sys.stderr.write("%s %-7s %s\n" % (iso_utc(time.time()), log.LEVEL_NAMES.get(level, level), text))
    sys.stderr.flush()


def _print_reading(reading):
    sys.stdout.write("%s  %s\n" % (iso_utc(reading.time)[11:23], summary_line(reading)))
    sys.stdout.flush()


def pin_bank(io_config):
    """The board's pin bank: the simulator's pin file, or Linux GPIO through libgpiod."""
    if io_config["driver"] == "sim":
        from .sim_pins import SimPinBank
        return SimPinBank(io_config)
    from .gpio import GpiodPinBank
    return GpiodPinBank(io_config)


def build_agent(config, clock, quiet=False, stream=None, pins=None, console_stream=None, board=None,
                restart=None):
    """Open the board's platform parts and build the station on them (``station.build_station``);
    returns (agent, publisher, stream, journal).

    ``stream`` and ``pins`` replace the board's serial line and pin bank (the fleet
    simulator gives each station simulated ones); ``console_stream``, ``board`` and
    ``restart`` are the technician console's, when the board has one."""
    meter_cfg = config["meter"]
    signer = FileKeySigner(config["signing"]["key_file"])
    reader_stream = None
    id_cfg = config["identification"]
    if id_cfg["enabled"]:
        if id_cfg["port"] is None:
            raise ConfigError("identification.port: needed when identification.enabled is true")
        # Opened by the reader task, and again after it was unplugged: never a reason not to start.
        reader_stream = SerialStream(id_cfg["port"], id_cfg["baudrate"], role="reader port")
    if pins is None:
        pins = pin_bank(config["io"])
    if stream is None:
        stream = SerialStream(meter_cfg["port"], meter_cfg["baudrate"], meter_cfg["parity"],
                              meter_cfg["stopbits"])
    topics = Topics(config["mqtt"]["topic_prefix"], config["station_id"])
    publisher = MqttPublisher(config["mqtt"], topics.status)
    ports = Ports(stream, FileSystem, publisher, pins, signer, reader_stream, console_stream, board, restart,
                  None if quiet else _print_reading)
    agent = build_station(config, clock, ports)
    return agent, publisher, stream, agent.outbox.journal


async def _run(agent, publisher, duration_s):
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, agent.stop)
    forwarder = agent.forwarder
    publisher.on_activity = lambda: loop.call_soon_threadsafe(forwarder.wake)
    try:
        await agent.run(duration_s)
    finally:
        publisher.on_activity = None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="evse-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--board", help="board file (JSON), e.g. boards/sim.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one board setting (repeatable)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--quiet", action="store_true", help="do not print live readings")
    parser.add_argument("--verbose", action="store_true", help="log debug lines (each failed poll)")
    parser.add_argument("--public-key", action="store_true",
                        help="print the station's OCMF public key (hex DER; created if missing) and exit")
    parser.add_argument("--pin-hash", metavar="PIN",
                        help="print the console.pin_hash value for a console PIN and exit ('-': read it from stdin)")
    parser.add_argument("--version", action="version", version="evse-agent " + __version__)
    args = parser.parse_args(argv)
    if args.pin_hash is not None:
        return _print_pin_hash(args.pin_hash)
    if args.board is None:
        parser.error("the following arguments are required: --board")
    log.set_sink(_stderr_sink, log.DEBUG if args.verbose else log.INFO)
    try:
        config = load_config(args.board, args.overrides)
    except ConfigError as error:
        sys.stderr.write("evse-agent: refusing to start: %s\n" % error)
        return 2
    if args.public_key:
        try:
            print(FileKeySigner(config["signing"]["key_file"]).public_key_hex())
        except (OSError, ValueError) as error:
            sys.stderr.write("evse-agent: %s\n" % error)
            return 1
        return 0
    clock = SystemClock(config["clock"]["sync"])
    restart = []
    agent = None

    def request_restart():
        restart.append(True)
        agent.stop()

    console = None
    try:
        console = open_console(config)
        board = None if console is None else BoardFile(args.board, args.overrides)
        agent, publisher, stream, journal = build_agent(config, clock, args.quiet, console_stream=console,
                                                        board=board, restart=request_restart)
    except (OSError, ValueError) as error:
        if console is not None:
            console.close()
        sys.stderr.write("evse-agent: refusing to start: %s\n" % error)
        return 1
    log.info("evse-agent %s station %s: meter %s unit %d on %s, broker %s:%d" % (
        __version__, config["station_id"], config["meter"]["model"], config["meter"]["unit_id"],
        config["meter"]["port"], config["mqtt"]["host"], config["mqtt"]["port"]))
    publisher.start()
    try:
        asyncio.run(_run(agent, publisher, args.duration))
    finally:
        journal.close()
        publisher.stop()
        stream.close()
        if console is not None:
            console.close()
    if restart:
        # The console's restart: the same interpreter, options and arguments again.
        log.warning("restarting: %s" % " ".join(sys.orig_argv))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
    return 0


def _print_pin_hash(pin):
    if pin == "-":
        pin = sys.stdin.readline().rstrip("\r\n")
    try:
        print(pin_hash(pin, os.urandom(8)))
    except ValueError as error:
        sys.stderr.write("evse-agent: %s\n" % error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
