"""Home Assistant discovery: the configs of each meter model, and their announcement after
each connect and on Home Assistant's birth message, run by the discovery task."""

import asyncio
import json

import harness
from evse_agent import ha_discovery
from evse_agent.config import validate
from evse_agent.ha_discovery import Discovery, discovery_messages
from evse_agent.meter_models import MODELS


class Publisher:
    """A port's publisher as discovery sees it: connected, a connect count, publish, subscribe."""

    def __init__(self):
        self.connected = False
        self.connects = 0
        self.sent = []
        self.subscriptions = {}

    def publish(self, topic, payload, qos=0, retain=False):
        if not self.connected:
            return None
        self.sent.append([topic, qos, retain])
        return len(self.sent)

    def subscribe(self, topic, on_message):
        self.subscriptions[topic] = on_message

    def connect(self):
        self.connected = True
        self.connects += 1


async def main():
    # A station id with a character Home Assistant does not take, and a non-ASCII device name.
    config = validate({"station_id": "garage.left", "meter": {"model": "sdm630", "port": "x"},
                       "homeassistant": {"device_name": "Garage S\u00fcd"}})
    harness.emit("node_id", config["homeassistant"]["node_id"])
    for name in sorted(MODELS):
        configs = {}
        for topic, payload in discovery_messages(config, MODELS[name], "0.1.0"):
            configs[topic] = json.loads(payload.decode())
        harness.emit("configs_" + name, configs)
        await harness.checkpoint(name)

    ha_discovery.CHECK_INTERVAL_S = 0.02
    publisher = Publisher()
    discovery = Discovery(config, MODELS["sdm120"], publisher, "0.1.0")
    harness.emit("subscribed", sorted(publisher.subscriptions))
    birth = publisher.subscriptions["homeassistant/status"]
    task = asyncio.create_task(discovery.run())
    steps = []

    async def step(label):
        await asyncio.sleep(0.1)
        steps.append([label, len(publisher.sent), discovery.announcements])

    await step("not connected")
    publisher.connect()
    await step("connected")
    await step("same connection")
    birth(b"offline")
    await step("birth offline")
    birth(b"online")
    await step("birth online")
    publisher.connected = False
    await step("disconnected")
    publisher.connect()
    await step("reconnected")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    harness.emit("announcements", steps)
    harness.emit("first_sent", publisher.sent[:3])
    await harness.checkpoint("announce")


if __name__ == "__main__":
    harness.run(main)
