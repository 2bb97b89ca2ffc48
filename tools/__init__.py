"""Host-side programs, by role: ``sim`` (simulated meter, vehicle, reader, serial link and
fleet), ``bench`` (``make bench``), ``testkit`` (broker, PostgreSQL, subscriber, load and the
MicroPython runners the tests and benchmarks start), ``cli`` (operator commands: journal,
OCMF verify, deploy, demo) and ``collector`` (the fleet backend service)."""
