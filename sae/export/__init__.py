"""Export and import: Hugging Face folders in our, SAELens', sparsify's and circuit-tracer's formats,
model cards, Hub upload.

The last stage (harvest -> buffer -> train -> eval -> export). ``sae-export`` writes a checkpoint
as one folder per hook point (:mod:`.export`), or a model's transcoders as one circuit-tracer
folder (:mod:`.circuit_tracer`); :func:`load_pretrained` reads any of these formats back into our
classes (:mod:`.load`).
"""

from .collect import collect
from .export import ExportResult, export_checkpoint, export_items
from .hub import MissingTokenError, push_to_hub
from .item import ExportItem
from .load import FORMATS, Pretrained, detect_format, load_pretrained, load_pretrained_with_info

__all__ = [
    "FORMATS", "ExportItem", "ExportResult", "MissingTokenError", "Pretrained", "collect", "detect_format",
    "export_checkpoint", "export_items", "load_pretrained", "load_pretrained_with_info", "push_to_hub",
]
