"""Test set-up: 8 virtual CPU devices, set once before jax is imported anywhere; no persistent
compilation cache in the test process."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests call the CLI's main() in this process, which would turn on JAX's persistent compilation
# cache for every later test (and write the whole suite's executables to ~/.cache). Off here; the
# cache's own tests run the CLI in subprocesses with the switch as they need it.
os.environ["JAXLAB_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
