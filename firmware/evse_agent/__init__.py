"""evse-agent: the charger-side agent of an EV charging station (portable core)."""

__version__ = "0.1.0"
