"""NeuCLIP's open_clip-style trainer.

Importing the package registers the project's own small model configs (`neuclip-tiny`, ...) with
open_clip, so `open_clip.create_model_and_transforms("neuclip-tiny", pretrained=ckpt)` works in any
process that has imported `training`. The registration is lazy: importing `training` does not import
open_clip (and so torch, seconds on a loaded machine), which lets `python -m training.main --help` and
flag errors answer at once. If open_clip is already imported the configs are registered now, else
right after open_clip's first import; `register_model_configs()` does it explicitly.
"""
import importlib.abc
import sys
from pathlib import Path as _Path

MODEL_CONFIG_DIR = _Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Add model_configs/ to open_clip's registry (imports open_clip). Idempotent."""
    global _registered
    if _registered:
        return
    import open_clip  # noqa: PLC0415  (the slow import this module avoids at package import)
    _registered = True
    open_clip.add_model_config(MODEL_CONFIG_DIR)


class _RegisterAfterOpenClipImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: finds open_clip's spec through the other finders and registers the
    configs once its module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "open_clip":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader

                class _Loader(importlib.abc.Loader):
                    def create_module(self, spec):
                        return loader.create_module(spec)

                    def exec_module(self, module):
                        loader.exec_module(module)
                        register_model_configs()

                spec.loader = _Loader()
                return spec
        return None


if "open_clip" in sys.modules:
    register_model_configs()
elif not any(isinstance(finder, _RegisterAfterOpenClipImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterOpenClipImport())
