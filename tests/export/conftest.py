"""Make the helpers of this folder (``saes``, ``fake_hub``) importable by the tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
