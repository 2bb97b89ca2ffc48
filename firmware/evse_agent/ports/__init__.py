"""The platform ports, and the contracts of the six roles the core asks of them.

Only ``ports/`` imports platform modules: ``cpython`` (Linux: pyserial, libgpiod, paho-mqtt,
cryptography) and ``micropython`` (ESP32: ``machine``, its own MQTT client, littlefs, the
pure-Python ``p256`` signer). A port opens its devices, hands them to
``station.build_station`` as a ``station.Ports`` and runs what only it can run (the network
loop, NTP, a watchdog). The stand-ins in ``host_tests/mpy_scenarios/fakes.py`` are the
reference implementations: the least an object needs to fill its role (optional parts
left out), on CPython and MicroPython alike.

Clock — called by nearly every core module (poll loop, session engine, journal, monitors).
  ``monotonic_ms() -> int``: milliseconds that never go back and never wrap;
  ``time() -> int or float``: wall-clock seconds since 1970 UTC (a board gives whole
  seconds); ``synced() -> bool``: whether wall time is synchronised (OCMF time flag ``S``,
  else ``U``). Never raises. Linux ``cpython.clock.SystemClock``, board
  ``micropython.clock.MicroClock``; reference ``FakeClock`` (moved by ``advance(ms)``).

Byte stream — the meter's RS-485 line (called by ``modbus_rtu.RtuMaster``), the RFID
  reader's line (``pn532.Pn532Reader``) and the console's line (``console.Console``, which
  needs only ``read`` and ``write``).
  ``write(data)``: send bytes (a small frame; may block for its wire time);
  ``await read(max_bytes, timeout_ms) -> bytes``: at least one byte that arrived within
  ``timeout_ms``, or ``b""`` on timeout — never more than ``max_bytes``;
  ``reset_input()``: drop what arrived and was not read. A device that can vanish (a USB
  adapter) raises a ``modbus_rtu.ModbusError`` of kind ``link`` from ``write`` / ``read``
  while it is gone (the transaction fails, the meter is reported offline) and is opened
  again on a later transaction: never a reason to stop. Linux ``cpython.serial_link.SerialStream`` and
  ``cpython.console_port.ConsoleStream``, board ``micropython.uart.UartStream`` and
  ``micropython.console.ReplStream``; reference ``ScriptedStream``.

File system — one directory (``session.state_dir``, ``journal.dir``); the port hands in a
  factory ``file_system(path)`` that makes the directory if missing. Names are relative.
  Called by ``store.StateStore`` (``read``, ``write_atomic``, ``remove``) and
  ``journal.Journal`` (all of them).
  ``read(name) -> bytes or None`` (None: no such file); ``read_from(name, offset, size=-1)
  -> bytes`` (``b""`` past the end or no file); ``write_atomic(name, data)``: the old or
  the new content after a crash, never a torn one; ``listdir() -> [name]``; ``size(name)
  -> int``; ``open_append(name)`` / ``open_read(name)`` -> a binary file;
  ``sync_file(handle)``: what was written is on the medium when it returns;
  ``truncate(name, size)``; ``rename(old, new)``; ``remove(name)`` (no such file is not an
  error); ``sync_dir()``: renames and removals are on the medium;
  ``free_bytes() -> int`` (optional: the console's selftest). A refusing disk raises
  ``OSError``; the journal and the store keep the record in memory and retry.
  Linux ``cpython.fs.FileSystem``, board ``micropython.fs.FileSystem`` (the reference:
  the scenarios run on each platform's own, ``harness.port_fs``).

Publisher — the MQTT link; called by ``messages.Outbox`` (live messages),
  ``forwarder.Forwarder`` (journal records), ``ha_discovery`` and ``identification``.
  ``publish(topic, payload, qos=0, retain=False) -> token or None``: queued, never blocking
  the event loop; None when it cannot take the message now (disconnected, buffer full: the
  forwarder tries again on the next wake-up); ``drain_acked() -> [token]``: the QoS 1 tokens
  the broker acknowledged since the last call; ``connected`` (bool), ``connects`` (count of
  accepted connections: retained messages go out again after each), ``last_error``
  (text or None). Optional: ``subscribe(topic, on_message)`` (``on_message(payload)``,
  subscribed again on every connect), ``await round_trip(topic, timeout_s) -> ms``
  (console selftest). The port sets ``on_activity`` to the forwarder's ``wake`` (called on
  every PUBACK and connection change) and runs the link (``start`` / ``run``, ``stop``).
  Linux ``cpython.mqtt.MqttPublisher``, board ``micropython.mqtt.MqttPublisher``;
  reference ``Publisher`` (acknowledges every QoS 1 token at once).

Pin bank — the charge point's inputs; called by ``pilot.InputMonitor`` every
  ``io.pilot.sample_ms`` (and by the console's ``status`` and ``selftest``).
  ``read() -> pilot.PinSample`` (the bank may reuse one object; None in a field the board
  cannot measure). An exception is counted by the input monitor and the sample skipped.
  Linux ``cpython.gpio.GpiodPinBank`` and ``cpython.sim_pins.SimPinBank``, board
  ``micropython.pins.MachinePinBank``; reference ``Pins`` (``set(volts, duty, command,
  feedback)``).

Signer — the station's OCMF key; called by ``ocmf.sign_document`` for the session
  engine. ``sign(data) -> bytes``: a DER ECDSA P-256/SHA-256 signature over ``data``;
  ``public_key_hex() -> str``: the DER public key in hex (what verifiers are given);
  ``verify(data, signature) -> bool`` (optional: the console checks documents with it).
  Tamper evidence made in software, not calibration-law conformance. Linux
  ``cpython.signer.FileKeySigner`` (``cryptography``), board
  ``micropython.signer.file_key_signer`` (``micropython.p256.Signer``); reference
  ``signer()``.
"""
