"""Make ``vlmr1_template`` importable when the template is not pip-installed.

Normally you ``pip install -e .`` a plugin before testing it; this fallback lets the
repository's whole test suite run the template's tests from a plain checkout too.
"""

import sys
from pathlib import Path

try:
    import vlmr1_template  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
