"""fclib: teaching small language models to reason by calling functions (the study's package)."""

import logging

# bitsandbytes' CPU backend tries, when it is imported, to fetch an optional 4-bit kernel from the hub and logs a
# warning when it cannot (offline: always). fclib never runs 4-bit on the CPU, so that line is only noise in every
# notebook that trains or evaluates a student. Set here, before any fclib module imports it; only that logger is
# quietened, and only below ERROR.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
