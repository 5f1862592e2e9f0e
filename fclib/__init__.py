"""fclib: teaching small language models to reason by calling functions (the study's package)."""

import logging
import warnings

# Two messages from the pinned libraries about nothing fclib can change, which would otherwise fill the output of
# every notebook that trains or evaluates a student. Set here, before any fclib module imports those libraries; each
# is matched exactly, and nothing else is hidden.
# - bitsandbytes' CPU backend tries, when imported, to fetch an optional 4-bit kernel from the hub and logs a warning
#   when it cannot (offline: always); fclib never runs 4-bit on the CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# - PEFT and TRL read `model.is_gradient_checkpointing`, which the pinned transformers renamed (a FutureWarning each
#   time an adapter is attached or a training pass starts).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
