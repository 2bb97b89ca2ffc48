"""Simulated hardware for the host: the Modbus meter and the PN532 reader on ptys, the vehicle
in a pin file, a paced pty serial link, and whole fleets of stations."""
