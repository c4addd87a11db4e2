"""Make the helpers of this folder (``wandb_records``, ``wandb_workers``) importable, also in spawned processes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
