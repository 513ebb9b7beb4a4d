"""Run pytest (same arguments as ``python -m pytest``) so that SIGINT stops it cleanly.

``benchmarks/gpu_check.sh`` caps each step with ``timeout -s INT``: on SIGINT
pytest stops at the current test, prints its summary line, and pytest-benchmark
writes its ``--benchmark-json`` with every benchmark finished so far. Python
turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when the
interpreter started, and a non-interactive shell starts background jobs with
SIGINT ignored; this wrapper installs the handler regardless.

    python benchmarks/capped_pytest.py tests -q ...
"""
import os
import signal
import sys

import pytest

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[0] = os.getcwd()  # as `python -m pytest` does
    sys.exit(pytest.main(sys.argv[1:]))
