"""Make ``vlmr1_mistral3`` importable when the example is not pip-installed (a plain checkout)."""

import sys
from pathlib import Path

try:
    import vlmr1_mistral3  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
