"""astrai_ds: a DeepSpeed trainer for bilingual decoder-only language models."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root: configs/, ds_configs/ and train.py live here (the package is installed editable).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
