"""Freeze evse-agent into a MicroPython firmware image (bytecode in flash, not in the heap).

From a MicroPython checkout (v1.22 or later), for example for an ESP32:

    make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/evse-agent/firmware/manifest.py

then flash the image (``make ... deploy`` or esptool) and copy the board file to ``/board.json``
(``tools/cli/deploy.py --board boards/esp32-sdm630.json --frozen`` does that and the rest). The
file list is the core without the CPython port; host_tests/mpy/test_micropython.py checks that it
matches the source tree.
"""

include("$(PORT_DIR)/boards/manifest.py")
require("ntptime")
package(
    "evse_agent",
    files=(
        "__init__.py",
        "agent.py",
        "aggregate.py",
        "config.py",
        "console/__init__.py",
        "console/help.py",
        "console/identification.py",
        "console/meter.py",
        "console/records.py",
        "console/selftest.py",
        "console/sessions.py",
        "console/settings.py",
        "console/status.py",
        "events.py",
        "forwarder.py",
        "ha_discovery.py",
        "identification.py",
        "journal.py",
        "journal_check.py",
        "log.py",
        "messages.py",
        "meter.py",
        "meter_models.py",
        "modbus_rtu.py",
        "ocmf.py",
        "pilot.py",
        "pn532.py",
        "reading.py",
        "registers.py",
        "session.py",
        "station.py",
        "store.py",
        "wakeup.py",
        "ports/__init__.py",
        "ports/micropython/__init__.py",
        "ports/micropython/clock.py",
        "ports/micropython/console.py",
        "ports/micropython/fs.py",
        "ports/micropython/main.py",
        "ports/micropython/mqtt.py",
        "ports/micropython/p256.py",
        "ports/micropython/pins.py",
        "ports/micropython/signer.py",
        "ports/micropython/uart.py",
        "ports/micropython/wifi.py",
    ),
    base_path=".",
)
