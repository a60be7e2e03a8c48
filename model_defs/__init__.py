"""Networks, their specs and the checkpoint format."""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_model, save_weights, unwrap
from .registry import FlipAverage, create_model, default_spec, list_models, register_model
from .spec import LABELS, ModelSpec
from . import image_nets  # noqa: F401  (registers the image networks)
from . import video_nets  # noqa: F401  (registers the video networks)

__all__ = [
    "LABELS", "ModelSpec", "FlipAverage", "create_model", "default_spec", "list_models", "register_model",
    "load_model", "load_checkpoint", "save_weights", "atomic_save", "unwrap", "CheckpointError",
]
