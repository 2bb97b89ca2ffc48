"""The MicroPython port (ESP32 class boards): machine.UART, machine.Pin / ADC, its own MQTT client, littlefs."""
