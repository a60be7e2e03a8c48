"""One preprocessing path: training, serving and the SDK turn a colour image into the same tensor."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from export.__main__ import main as export_main
from handlers.image_handler import EmotionImageHandler
from handlers.preprocess import normalize, spec_uint8, to_grey, to_uint8
from model_defs import create_model, save_weights
from tests.handler_context import make_context
from training.datasets import ImageFolderDataset
from training.sdk import EmotionRecognizer

COLOUR = sorted((Path(__file__).parent / "fixtures" / "colour").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    save_weights(create_model("emo_mobilenet_v2"), tmp / "w.pth")
    return tmp / "w.pth"


@pytest.fixture(scope="module")
def handler(weights, tmp_path_factory) -> EmotionImageHandler:
    tmp = tmp_path_factory.mktemp("mar")
    assert export_main(["--task", "image", "--checkpoint", str(weights), "--out", str(tmp)]) == 0
    with zipfile.ZipFile(tmp / "emotion_image.mar") as z:
        z.extractall(tmp / "model")
    h = EmotionImageHandler()
    h.initialize(make_context(tmp / "model", 1, {"detection": "never"}))
    return h


def test_grey_is_pil_luma_bit_for_bit():
    rgb = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB").convert("L")
    assert torch.equal(to_grey(rgb)[0], torch.from_numpy(np.array(pil)))


def test_colour_image_gives_one_tensor_in_training_serving_and_sdk(weights, handler, tmp_path):
    spec = handler.spec
    assert spec["channels"] == 1 and spec["input_size"] == 64
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / COLOUR.name).write_bytes(COLOUR.read_bytes())

    trained, _ = ImageFolderDataset(tmp_path, spec)[0]  # training and training.evaluate
    crops, _, _ = handler.preprocess([{"body": COLOUR.read_bytes()}])  # serving
    served = crops.tensors[0]
    sdk = EmotionRecognizer(video=False, pretrained=False, model="emo_mobilenet_v2", face_detection="never",
                            output_dir=tmp_path / "runs")
    sdk.net.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    pixels = torch.from_numpy(np.asarray(Image.open(COLOUR).convert("RGB")).copy()).permute(2, 0, 1)
    from_float = sdk.model_input((pixels.float() / 255)[None])[0]  # the SDK, ToTensor() convention
    from_file = sdk._file_input(COLOUR)  # the SDK, a file path

    assert trained.shape == served.shape == (1, 64, 64) and trained.dtype == torch.uint8
    assert torch.equal(trained, served)
    assert torch.equal(normalize(trained, spec), from_float)
    assert torch.equal(normalize(trained, spec), from_file)
    assert torch.equal(trained, to_uint8(Image.open(COLOUR), spec))
    assert trained.float().std() > 10  # a real face, not a constant


def test_spec_uint8_shrinks_with_antialiasing():
    """A one-pixel checkerboard shrunk 4x becomes flat grey (no aliasing), as PIL's resize does."""
    board = ((torch.arange(256)[:, None] + torch.arange(256)[None]) % 2 * 255).to(torch.uint8)[None]
    out = spec_uint8(board, {"channels": 1, "input_size": 64})
    assert out.shape == (1, 64, 64)
    assert (out.float() - 127.5).abs().max() <= 1
