"""nbval runs the committed notebooks on the `smoke` profile (see fclib.profiles.notebook_profile)."""

import os

os.environ.setdefault("FCLIB_NOTEBOOK_PROFILE", "smoke")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
