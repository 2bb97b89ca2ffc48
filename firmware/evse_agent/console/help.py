"""Console help: every command's usage rows and explanation (``help``, ``help <command>``).

Loaded when ``help`` is first used, so the text takes no heap before. ``HELP`` maps a command
name to ``(rows, text)``: rows are (usage, summary, needs unlock) for the list, text the
lines of ``help <command>``; the list follows ``COMMANDS`` (the package) in order."""

from .. import log

HELP = {
    "status": (
        (("status", "version, uptime, pilot, session, links, clock", False),),
        ("One screen of station health: firmware version and uptime, pilot state and",
         "contactor, the open session, meter link, broker link, journal backlog,",
         "clock synchronisation, active events and the console lock."),
    ),
    "meter": (
        (("meter", "the latest reading, per phase", False),
         ("meter watch", "a line per new reading until a key is pressed", False),
         ("meter regs <addr> <n>", "raw read of n registers (diagnosis)", False)),
        ("meter: model, unit, serial, link state and the latest reading.",
         "meter watch: one line per poll; any key stops it (and is used up).",
         "meter regs <addr> <n> [input|holding]: reads n (1-125) registers from",
         "address addr (decimal or 0x hex) with function 04 (input, the default) or",
         "03 (holding), beside the poller; shows each word and float32 pairs.",
         "Example: meter regs 0x48 2 is the SDM630 import register in kWh."),
    ),
    "pilot": (
        (("pilot", "pilot state, duty, offered current, contactor", False),),
        ("The accepted (debounced) pilot state, PWM duty and offered current, the",
         "contactor lines, how long the state has held, one raw read of the pins",
         "now, and the sampler's counters."),
    ),
    "session": (
        (("session", "the open session", False),
         ("session show <id>", "one session with its OCMF documents", False)),
        ("session: the open session (energy so far, begin reading, flags).",
         "session show <id>: the latest record of a session still in the journal,",
         "with every OCMF document on a line of its own (copy it into a verifier).",
         "<id> is the full id (sim-001-000003) or just its number (3)."),
    ),
    "sessions": (
        (("sessions [n]", "the last n sessions in the journal (10)", False),),
        ("The last n sessions whose records are still in the journal: plug-in time,",
         "plugged time, billed energy, flags. Segments the broker has acknowledged",
         "are deleted, so older sessions are only at the backend."),
    ),
    "events": (
        (("events [n]", "the last n power and safety events (10)", False),),
        ("The last n events raised or cleared since the agent started, with their",
         "values, and the events active now."),
    ),
    "journal": (
        (("journal [verify]", "journal statistics; check CRCs, seq, signatures", False),),
        ("journal: size, sequence numbers, backlog, forwarder window, alarms.",
         "journal verify: reads every segment and checks each record's CRC, that",
         "sequence numbers follow (gaps only where a summary covers them), and",
         "every OCMF signature of the session records with the station key."),
    ),
    "mqtt": (
        (("mqtt", "broker connection, last error, backlog", False),),
        ("Broker address, TLS and login, connection state, the last error, and what",
         "waits to be published."),
    ),
    "config": (
        (("config show [section]", "the running settings", False),
         ("config get <setting>", "one setting, its rule and help", False),
         ("config set <setting> <v>", "change a setting (same rules as the file)", True),
         ("config save", "write the board file (keeps a .bak)", True)),
        ("Settings are named as in the board file, e.g. mqtt.telemetry_interval_s.",
         "config set checks the value against the board file schema; intervals,",
         "timeouts and event thresholds apply at once, others after a restart.",
         "config save writes the board file atomically and keeps the old one as",
         ".bak. Passwords and the PIN hash are never shown."),
    ),
    "selftest": (
        (("selftest", "meter, GPIO, broker, signing and journal checks", False),),
        ("Reads the meter's import register, reads the pins once (pilot in range,",
         "contactor feedback agrees with the command), sends a message to the",
         "broker and receives it back, signs and verifies a test OCMF document, and",
         "writes, reads back and removes a probe file in the journal directory."),
    ),
    "id": (
        (("id", "RFID reader, allow-list, last tag", False),
         ("id allow|deny <UID>", "change the allow-list until restart", True)),
        ("The identification reader's state and counters, the allow-list and its",
         "source, and the last tag. id allow / id deny change the running list."),
    ),
    "log": (
        (("log [n]", "the last n log lines (20)", False),),
        ("The last n lines of the agent's log (at most %d are kept)." % log.RING_SIZE,),
    ),
    "unlock": (
        (("unlock [PIN]", "allow the commands marked *", False),
         ("lock", "lock again", False)),
        ("unlock <PIN>, or unlock alone to type the PIN unseen. The console locks",
         "again after console.lock_after_s without input. Each wrong PIN doubles",
         "the wait before the next try and is reported as an event."),
    ),
    "lock": (
        (),
        ("Lock the console now.",),
    ),
    "restart": (
        (("restart", "clean shutdown, then start again", True),),
        ("Stops the agent cleanly (journal synced, broker told 'offline') and starts",
         "it again with the same command line."),
    ),
    "help": (
        (("help [command]", "this list, or one command in detail", False),),
        ("help lists the commands; help <command> explains one.",),
    ),
}
