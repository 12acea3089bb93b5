"""NeuCLIP's open_clip-style trainer.

Importing the package registers the project's own small model configs (`neuclip-tiny`, ...) with
open_clip, so `open_clip.create_model_and_transforms("neuclip-tiny", pretrained=ckpt)` works in any
process that has imported `training`.
"""
from pathlib import Path as _Path

import open_clip as _open_clip

MODEL_CONFIG_DIR = _Path(__file__).parent / "model_configs"
_open_clip.add_model_config(MODEL_CONFIG_DIR)
