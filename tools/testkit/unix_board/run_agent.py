"""Start the MicroPython port's agent on the host board: ``micropython run_agent.py BOARD``.

What a board's ``/main.py`` does, with the board file's path from the command line.
"""

import sys

from evse_agent.ports.micropython import main

sys.exit(main.main(sys.argv[1]))
