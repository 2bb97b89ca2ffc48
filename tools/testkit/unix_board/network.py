"""``network`` of the host board: a Wi-Fi station that is up once asked to connect.

The host reaches the broker over loopback; this stand-in lets the port's Wi-Fi task run as
on a board (connect, watch, report the address).
"""

STA_IF = 0
AP_IF = 1


class WLAN:
    def __init__(self, interface=STA_IF):
        self._active = False
        self._connected = False

    def active(self, state=None):
        if state is not None:
            self._active = bool(state)
        return self._active

    def connect(self, ssid=None, password=None):
        if not self._active:
            raise OSError("Wi-Fi interface not active")
        self._connected = True

    def disconnect(self):
        self._connected = False

    def isconnected(self):
        return self._connected

    def ifconfig(self):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
