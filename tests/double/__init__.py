"""A local double of AssemblyAI Universal Streaming v3 for tests and benchmarks.

Run it alone (from the repository root; prints its URL, runs until Ctrl-C)::

    .venv/bin/python -m tests.double --port 8765 --key test-key

See ``python -m tests.double --help`` for behaviour and fault options.
"""

from tests.double.config import U3, UNIVERSAL, DoubleConfig
from tests.double.records import SessionRecord
from tests.double.server import DoubleServer

__all__ = ["U3", "UNIVERSAL", "DoubleConfig", "DoubleServer", "SessionRecord"]
