"""The composition root: one charging station built whole from its board and its platform.

``build_station(config, clock, ports)`` is the only place the core is wired; both ports'
``main``, the fleet simulators and the tests call it. It recovers the journal, raises the
state store's counters to what the journal shows, builds the RTU master and meter on the
meter's byte stream, the forwarder and outbox on the publisher, and returns the ``Agent``,
which builds the session engine, power monitor, input monitor and the optional parts the
board asks for (Home Assistant discovery, RFID reader, console) and continues an open
session. The agent's journal, publisher and forwarder are ``agent.outbox.journal``,
``agent.outbox.publisher`` and ``agent.forwarder``; what the journal found at start is
``journal.report``, the session continued is ``agent.restored``.

``Ports`` names the platform parts; their contracts are in ``ports/__init__.py``. The port
keeps what only it knows: opening devices, running the publisher's network loop, closing
everything at exit.
"""

from .agent import Agent
from .forwarder import Forwarder
from .journal import Journal
from .messages import Outbox, Topics
from .meter import ModbusMeter
from .meter_models import model_named
from .modbus_rtu import RtuMaster
from .store import StateStore


class Ports:
    """The platform parts of one station (roles and contracts: ``ports/__init__.py``).

    ``meter_stream``: byte stream to the meter; ``file_system(path)``: a file system object
    rooted at ``path``; ``publisher``; ``pins``: pin bank; ``signer``. As the board has
    them: ``reader_stream`` (byte stream to the PN532 reader), ``console_stream`` with
    ``board`` (the board file the console edits, or None) and ``restart`` (the console's
    restart, or None); ``on_reading(reading)`` shows live readings.
    """

    def __init__(self, meter_stream, file_system, publisher, pins, signer, reader_stream=None,
                 console_stream=None, board=None, restart=None, on_reading=None):
        self.meter_stream = meter_stream
        self.file_system = file_system
        self.publisher = publisher
        self.pins = pins
        self.signer = signer
        self.reader_stream = reader_stream
        self.console_stream = console_stream
        self.board = board
        self.restart = restart
        self.on_reading = on_reading


def build_station(config, clock, ports):
    """The station's ``Agent`` for the validated board ``config``, on ``clock`` and ``ports``."""
    meter_cfg = config["meter"]
    journal_cfg = config["journal"]
    file_system = ports.file_system
    # The journal's directory keeps a second copy of the counters (see store.py).
    store = StateStore(file_system(config["session"]["state_dir"]), file_system(journal_cfg["dir"]))
    journal = Journal(file_system(journal_cfg["dir"]), journal_cfg, clock)
    journal.recover()
    store.recover_from_journal(journal)
    master = RtuMaster(ports.meter_stream, clock, meter_cfg["baudrate"], meter_cfg["timeout_ms"],
                       meter_cfg["retries"])
    meter = ModbusMeter(master, model_named(meter_cfg["model"]), meter_cfg["unit_id"], clock,
                        meter_cfg["offline_after"])
    topics = Topics(config["mqtt"]["topic_prefix"], config["station_id"])
    forwarder = Forwarder(journal, ports.publisher, topics, clock, journal_cfg["window"])
    outbox = Outbox(ports.publisher, config["station_id"], journal, forwarder)
    return Agent(config, clock, meter, outbox, store, ports)
