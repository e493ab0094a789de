"""``python -m jaxlab.native [--force]``: build the native CPU kernels."""

import logging
import sys

from jaxlab.native import build

logging.basicConfig(level=logging.INFO)
try:
    print(f"built {build(force='--force' in sys.argv)}")
except RuntimeError as e:  # the XLA path still works; say so and do not fail the install
    print(f"native kernels not built ({e}); jaxlab will use XLA for them", file=sys.stderr)
