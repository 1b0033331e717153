"""Every test process sees 8 simulated CPU devices, so sharded and single-device runs can be compared."""

import logging
import os
import sys
from pathlib import Path

import pytest

# The tests' models are tiny, so compiling them costs more than running them: LLVM's optimisation
# passes are skipped (about half the suite's CPU time). Only code generation changes, not the
# HLO programs the tests inspect.
COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's process, or a subprocess it starts, with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(autouse=True)
def no_log_handler_on_a_closed_stream():
    """A test that runs main.py or export.py in this process (main.main) leaves metrics.setup_logging's
    root handler writing to that test's captured stdout, closed once it ends; a later test in the
    same process whose code logs through the root handler (run_experiment.run) would print a
    "Logging error" traceback to its stderr. Such handlers are removed before each test."""
    for handler in logging.root.handlers[:]:
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            logging.root.removeHandler(handler)
