"""Checkpoint → TorchScript (spec inside) → TorchServe ``.mar`` archive.

``python -m export --task image --checkpoint pretrain/emotion_image.pth --out model_store/``
"""
from .archive import TASKS, TaskPackage, build_archive, model_config_for
from .torchscript import export_torchscript, verify_scripted

__all__ = ["TASKS", "TaskPackage", "build_archive", "model_config_for", "export_torchscript", "verify_scripted"]
