"""Operator commands: ``evse-journal``, ``evse-ocmf-verify``, deploy to a MicroPython board
(with the core's .mpy build), and ``make demo``."""
