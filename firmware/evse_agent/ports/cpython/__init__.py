"""CPython port (Linux single-board computers): pyserial, paho-mqtt, the system clock."""
