"""The kernel tests run Triton's CPU interpreter: it must be chosen before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
