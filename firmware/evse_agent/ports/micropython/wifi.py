"""Wi-Fi station link with back-off: connect, watch, reconnect (``network.WLAN``)."""

import asyncio

import network

from ... import log


class Wifi:
    def __init__(self, ssid, password, min_s=1, max_s=60, connect_timeout_s=15):
        self.ssid = ssid
        self.password = password
        self.min_s = min_s
        self.max_s = max_s
        self.connect_timeout_s = connect_timeout_s
        self.wlan = network.WLAN(network.STA_IF)
        self.attempts = 0
        self._stopping = False

    def is_up(self):
        return self.wlan.isconnected()

    async def run(self):
        wlan = self.wlan
        wlan.active(True)
        delay = self.min_s
        while not self._stopping:
            if wlan.isconnected():
                delay = self.min_s
                await asyncio.sleep(2)
                continue
            self.attempts += 1
            try:
                wlan.connect(self.ssid, self.password)
            except OSError as error:
                log.warning("Wi-Fi %s: %s" % (self.ssid, error))
            waited = 0
            while not wlan.isconnected() and waited < self.connect_timeout_s:
                await asyncio.sleep(1)
                waited += 1
            if wlan.isconnected():
                log.info("Wi-Fi %s up: %s" % (self.ssid, wlan.ifconfig()[0]))
                continue
            log.warning("Wi-Fi %s: not connected after %d s; next try in %d s"
                        % (self.ssid, self.connect_timeout_s, delay))
            try:
                wlan.disconnect()
            except OSError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_s)

    def stop(self):
        self._stopping = True
