"""What the tests and benchmarks start around the agent: a private mosquitto, a throwaway
PostgreSQL, a subscriber, a busy-machine load, and the MicroPython runners (the unix port's
host board in ``unix_board/``, the WebAssembly port's npm package in ``mpy/``)."""
