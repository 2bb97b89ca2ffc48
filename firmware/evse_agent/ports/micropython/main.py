"""The agent on an ESP32-class board: ``import evse_agent.ports.micropython.main as m; m.main()``.

``boot``: read ``/board.json`` — the same board file as on Linux, plus a ``micropython``
section for what only a microcontroller has (UART pins, DE pin, ADC pin, Wi-Fi, NTP,
watchdog) that is taken out before the common file is validated — then build the station on
the board with ``station.build_station`` as Linux does, and run one asyncio task per concern:

- Wi-Fi with back-off; MQTT (``mqtt.py``, never blocking the loop) reconnecting with back-off
  once Wi-Fi is up;
- NTP (``ntptime``) until the first success, then every ``ntp_interval_s``: OCMF readings
  carry the time flag ``U`` until the clock was synchronised;
- the agent (meter poll loop, input monitor, supervisor, forwarder);
- the watchdog: ``machine.WDT`` is fed only while the poll loop and the input monitor make
  progress, so a hung loop (or a blocked event loop) resets the board.

The journal and the state live on the board's littlefs (``journal.dir``, ``session.state_dir``).
"""

import asyncio
import json
import time

from ... import __version__, log
from ...config import ConfigError, validate
from ...messages import Topics
from ...station import Ports, build_station
from .clock import MicroClock
from .fs import FileSystem

BOARD_FILE = "/board.json"

# The board file's "micropython" section: name -> (default, required type or None)
PORT_FIELDS = {
    "uart_id": (2, int),
    "tx_pin": (None, int),
    "rx_pin": (None, int),
    "de_pin": (None, int),            # RS-485 driver enable (DE and /RE tied); null: auto-direction
    "de_active_high": (True, bool),
    "adc_pin": (None, int),           # pilot voltage divider (io.pilot.source "adc")
    "wifi_ssid": (None, str),
    "wifi_password": (None, str),
    "ntp_host": ("pool.ntp.org", str),
    "ntp_interval_s": (21600, int),
    "watchdog_s": (30, int),          # 0: no watchdog
}


def split_board(doc):
    """(common board document, port settings) — ConfigError naming a bad port field."""
    doc = dict(doc)
    section = doc.pop("micropython", {})
    if not isinstance(section, dict):
        raise ConfigError("micropython: expected an object")
    port = {}
    for key in section:
        if key not in PORT_FIELDS:
            raise ConfigError("micropython.%s: unknown field (known: %s)" % (key, ", ".join(sorted(PORT_FIELDS))))
    for key, (default, kind) in PORT_FIELDS.items():
        value = section.get(key, default)
        if value is not None and not isinstance(value, kind):
            raise ConfigError("micropython.%s: %s is not %s" % (key, json.dumps(value), kind.__name__))
        port[key] = value
    for key in ("tx_pin", "rx_pin"):
        if port[key] is None:
            raise ConfigError("micropython.%s: missing (GPIO of the RS-485 transceiver)" % key)
    return doc, port


def load_board(path=BOARD_FILE):
    try:
        with open(path) as handle:
            doc = json.loads(handle.read())
    except OSError as error:
        raise ConfigError("%s: cannot read board file (%s)" % (path, error))
    except ValueError as error:
        raise ConfigError("%s: not valid JSON (%s)" % (path, error))
    if not isinstance(doc, dict):
        raise ConfigError("%s: expected a JSON object at the top level" % path)
    common, port = split_board(doc)
    try:
        return validate(common), port
    except ConfigError as error:
        raise ConfigError("%s: %s" % (path, error))


def _console_sink(level, text):
    print("%s %s" % (log.LEVEL_NAMES.get(level, level), text))


def build(config, port, clock, console_stream=None, restart=None):
    """Open the board's hardware and build the station on it (``station.build_station``);
    returns (agent, publisher, journal)."""
    from .mqtt import MqttPublisher
    from .pins import MachinePinBank
    from .signer import file_key_signer
    from .uart import UartStream

    meter_cfg = config["meter"]
    signer = file_key_signer(config["signing"]["key_file"], _write_atomic)
    if signer.created:
        log.info("created the station key %s; public key %s" % (config["signing"]["key_file"], signer.public_key_hex()))
    stream = UartStream(port["uart_id"], meter_cfg["baudrate"], meter_cfg["parity"], meter_cfg["stopbits"],
                        port["tx_pin"], port["rx_pin"], port["de_pin"], port["de_active_high"])
    topics = Topics(config["mqtt"]["topic_prefix"], config["station_id"])
    publisher = MqttPublisher(config["mqtt"], topics.status, clock)
    reader_stream = None
    id_cfg = config["identification"]
    if id_cfg["enabled"]:  # PN532 in HSU mode on its own UART
        if None in (id_cfg["uart_id"], id_cfg["tx_pin"], id_cfg["rx_pin"]):
            raise ConfigError("identification.uart_id, tx_pin and rx_pin are needed when enabled")
        reader_stream = UartStream(id_cfg["uart_id"], id_cfg["baudrate"], "N", 1, id_cfg["tx_pin"], id_cfg["rx_pin"])
    ports = Ports(stream, FileSystem, publisher, MachinePinBank(config["io"], port), signer, reader_stream,
                  console_stream, None, restart)
    agent = build_station(config, clock, ports)
    publisher.on_activity = agent.forwarder.wake
    return agent, publisher, agent.outbox.journal


def _write_atomic(path, data):
    slash = path.rfind("/")
    FileSystem(path[:slash] if slash > 0 else "/").write_atomic(path[slash + 1:], data)


async def keep_time(clock, host, interval_s):
    """NTP: retry every 60 s until the first success, then every ``interval_s``."""
    import ntptime
    ntptime.host = host
    while True:
        try:
            ntptime.settime()
            clock.set_synced()
            log.info("clock synchronised with %s" % host)
            await asyncio.sleep(interval_s)
        except (OSError, OverflowError) as error:
            log.debug("NTP %s: %s" % (host, error))
            await asyncio.sleep(60)


async def watchdog(agent, timeout_s, poll_interval_s):
    """Feed ``machine.WDT`` only while the poll loop and the input monitor make progress."""
    from machine import WDT
    wdt = WDT(timeout=timeout_s * 1000)
    stall_ms = int(max(3 * poll_interval_s, 5) * 1000)
    last = (agent.cycles, agent.inputs.samples)
    progress_ms = time.ticks_ms()
    while True:
        await asyncio.sleep(1)
        now = (agent.cycles, agent.inputs.samples)
        if now[0] != last[0] and now[1] != last[1]:
            progress_ms = time.ticks_ms()
            last = now
        if time.ticks_diff(time.ticks_ms(), progress_ms) < stall_ms:
            wdt.feed()
        else:
            log.error("main loop stalled (poll cycles %d, input samples %d): not feeding the watchdog"
                      % now)


async def run(config, port):
    from .console import open_console

    clock = MicroClock(config["clock"]["sync"])
    agent = None

    def escape():  # the technician's Ctrl-C on the REPL console
        agent.stop()

    console = open_console(config, escape)
    restart = None
    if console is not None:
        import machine
        restart = machine.reset
    try:
        agent, publisher, journal = build(config, port, clock, console, restart)
    except BaseException:
        if console is not None:
            console.close()  # keyboard interrupt on again
        raise
    tasks = []
    network_up = None
    if port["wifi_ssid"]:
        from .wifi import Wifi
        wifi = Wifi(port["wifi_ssid"], port["wifi_password"], config["mqtt"]["reconnect_min_s"],
                    config["mqtt"]["reconnect_max_s"])
        network_up = wifi.is_up
        tasks.append(asyncio.create_task(wifi.run()))
    tasks.append(asyncio.create_task(publisher.run(network_up)))
    tasks.append(asyncio.create_task(keep_time(clock, port["ntp_host"], port["ntp_interval_s"])))
    if port["watchdog_s"]:
        tasks.append(asyncio.create_task(watchdog(agent, port["watchdog_s"], config["meter"]["poll_interval_s"])))
    try:
        await agent.run()
    finally:
        for task in tasks:
            task.cancel()
        journal.close()
        publisher.stop()
        if console is not None:
            console.close()


def main(board_file=BOARD_FILE):
    log.set_sink(_console_sink)
    try:
        config, port = load_board(board_file)
    except ConfigError as error:
        print("evse-agent: refusing to start: %s" % error)
        return 2
    log.info("evse-agent %s station %s: meter %s unit %d on UART%d" % (
        __version__, config["station_id"], config["meter"]["model"], config["meter"]["unit_id"], port["uart_id"]))
    asyncio.run(run(config, port))
    return 0
