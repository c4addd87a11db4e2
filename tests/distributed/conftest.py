"""Make ``workers`` importable in the test module and in spawned processes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
