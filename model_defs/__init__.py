"""Networks, their specs and the checkpoint format."""
from .checkpoint import (CheckpointError, adapt_input_channels, atomic_save, atomic_write, checkpoint_dict,
                         is_checkpoint, load_checkpoint, load_file,
                         load_model, metadata, save_weights, unwrap)
from .defaults import DEFAULT_MODEL, SHIPPED_WEIGHTS
from .inference import ViewAverage, TemperatureScaled, inference_model
from .registry import create_model, default_spec, list_models, register_model
from .spec import LABELS, ModelSpec, with_channels
from . import image_nets  # noqa: F401  (registers the image networks)
from . import face_nets  # noqa: F401  (registers the face-pretrained image network)
from . import efficientnet_lite  # noqa: F401  (registers EfficientNet-Lite2)
from . import video_nets  # noqa: F401  (registers the video networks)

__all__ = [
    "DEFAULT_MODEL", "SHIPPED_WEIGHTS", "LABELS", "ModelSpec",
    "create_model", "default_spec", "list_models", "register_model",
    "ViewAverage", "TemperatureScaled", "inference_model",
    "load_model", "load_checkpoint", "load_file", "is_checkpoint", "save_weights", "atomic_save",
    "checkpoint_dict", "metadata", "unwrap", "CheckpointError", "adapt_input_channels", "with_channels", "atomic_write",
]
