"""The seed's Python SDK (``Emotion_Recognize``) on real faces, image and video, on the CPU.

Data is generated in the seed's layouts from the FER2013 face fixtures: RAF-DB style list files
with 100x100 colour images, and AFEW style frame folders read into ``[3, 16, 224, 224]`` clips.
The "seed scripts" below use only the names and arguments of the seed's README.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from handlers.preprocess import to_model_input, to_uint8
from model_defs import DEFAULT_MODEL, LABELS, CheckpointError, create_model, load_model, save_weights
from training import Emotion_Recognize, EmotionRecognizer, sdk, seed_sdk

from .seed_datasets import AFEWRecogSet, AFEWTrainSet, RAFRecogSet, RAFTrainSet

FACES = Path(__file__).parent / "fixtures" / "faces"


def _faces() -> list[tuple[Path, int]]:
    found = [(p, LABELS.index(d.name)) for d in sorted(FACES.iterdir()) if d.name in LABELS
             for p in sorted(d.glob("*.jpg"))] if FACES.is_dir() else []
    if not found:
        pytest.skip(f"face fixtures missing: {FACES}/<class>/*.jpg")
    return found


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    """Empty weights, shipped-weights and output folders in place of the repository's."""
    d = {k: tmp_path / k for k in ("pretrain", "shipped", "log")}
    for p in d.values():
        p.mkdir()
    monkeypatch.setattr(seed_sdk, "DEFAULT_WEIGHTS_DIR", d["pretrain"])
    monkeypatch.setattr(sdk, "SHIPPED_WEIGHTS", {t: d["shipped"] / f"emotion_{t}.pth" for t in ("image", "video")})
    monkeypatch.setattr(sdk, "DEFAULT_OUTPUT_DIR", d["log"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.manual_seed(0)
    random.seed(0)
    return d


@pytest.fixture(scope="module")
def raf(tmp_path_factory) -> dict[str, Path]:
    """RAF-DB layout: ``aligned/<name>.jpg`` (100x100 RGB) and list files ``name label`` (1-7)."""
    root = tmp_path_factory.mktemp("raf")
    (root / "aligned").mkdir()
    train, test = [], []
    for i, (path, label) in enumerate(_faces()):
        name = f"train_{i:05d}_aligned.jpg"
        Image.open(path).convert("RGB").resize((100, 100), Image.BICUBIC).save(root / "aligned" / name, quality=95)
        train.append(f"{name} {label + 1}")
        if i % 2 == 0:
            test.append(f"{name} {label + 1}")
    (root / "train_set").write_text("\n".join(train) + "\n")
    (root / "test_set").write_text("\n".join(test) + "\n")
    return {"data_dir": root / "aligned", "train_list": root / "train_set", "test_list": root / "test_set"}


def _moving_frames(face: Path, n: int = 18, side: int = 64) -> list[Image.Image]:
    """A short 'video' of one face drifting a pixel per frame (frames differ)."""
    base = np.asarray(Image.open(face).convert("RGB").resize((side + n, side + n), Image.BICUBIC))
    return [Image.fromarray(base[i:i + side, i:i + side].copy()) for i in range(n)]


@pytest.fixture(scope="module")
def afew(tmp_path_factory) -> dict[str, Path]:
    """AFEW layout: one folder of frames per clip and a list file ``folder label`` (0-6)."""
    root = tmp_path_factory.mktemp("afew")
    faces = {label: path for path, label in _faces()}
    lines = []
    for k, label in enumerate(sorted(faces)[:3]):
        folder = root / "Faces" / f"{k:03d}"
        folder.mkdir(parents=True)
        for j, frame in enumerate(_moving_frames(faces[label])):
            frame.save(folder / f"{j:03d}.jpg", quality=95)
        lines.append(f"{folder.name} {label}")
    (root / "train_set.txt").write_text("\n".join(lines) + "\n")
    return {"data_dir": root / "Faces", "list": root / "train_set.txt", "face": faces[sorted(faces)[0]]}


# ------------------------------------------------------------------ the seed's scripts

def seed_image_script(train_list, test_list, data_dir):
    """Written against the seed's README: names, arguments and return shapes only."""
    train_loader = DataLoader(RAFTrainSet(train_list, data_dir), batch_size=4, shuffle=True)
    test_loader = DataLoader(RAFTrainSet(test_list, data_dir), batch_size=8, shuffle=False)
    recog_loader = DataLoader(RAFRecogSet(test_list, data_dir), batch_size=8, shuffle=False)
    model = Emotion_Recognize(Video=False, pretrain=True, nGPU=0)
    summary = model.train(train_loader, test_loader, 2, learn_rate=0.00003, momentum=0.9, weight_decay=0.0005)
    result = model.eval(test_loader, epoch=1)
    image, _ = test_loader.dataset[0]
    prediction = model.recognize(image)
    results = model.batch_recognize(recog_loader)
    return model, summary, result, prediction, results


def seed_video_script(train_list, data_dir):
    """The seed's README usage for video (its default ``Video=True``)."""
    train_loader = DataLoader(AFEWTrainSet(train_list, data_dir), batch_size=3, shuffle=True)
    test_loader = DataLoader(AFEWTrainSet(train_list, data_dir), batch_size=4, shuffle=False)
    recog_loader = DataLoader(AFEWRecogSet(train_list, data_dir), batch_size=4, shuffle=False)
    model = Emotion_Recognize(pretrain=True, nGPU=0)
    summary = model.train(train_loader, test_loader, epochs=1)
    result = model.eval(test_loader)
    clip, _ = test_loader.dataset[0]
    prediction = model.recognize(clip)
    results = model.batch_recognize(recog_loader)
    return model, summary, result, prediction, results


def test_seed_image_script(dirs, raf):
    save_weights(create_model("emo_resnet_s"), dirs["pretrain"] / "origin_pic_model.pth")
    model, summary, result, prediction, results = seed_image_script(raf["train_list"], raf["test_list"],
                                                                    raf["data_dir"])
    assert set(summary) == {"acc", "acc_top3", "best_epoch"}
    assert summary["best_epoch"] in (1, 2)
    assert 0.0 <= summary["acc"] <= summary["acc_top3"] <= 1.0
    best = dirs["log"] / "image" / "best_pic_model.pth"  # runs/, not the weights folder
    assert load_model(best).spec.arch == "emo_resnet_s" and not list(dirs["pretrain"].glob("best_*"))
    assert torch.load(best, weights_only=True)["metrics"]["best_epoch"] == summary["best_epoch"]
    assert list((dirs["log"] / "image" / "tb").glob("events.out.tfevents.*")), "no TensorBoard log"
    # the recognizer holds the best epoch's weights after training
    assert set(result) == {"acc", "acc_top3"}
    assert result["acc"] == pytest.approx(summary["acc"])
    assert result["acc_top3"] == pytest.approx(summary["acc_top3"])

    names = [line.split()[0] for line in raf["test_list"].read_text().split("\n") if line]
    paths = [str(raf["data_dir"] / n) for n in names]
    assert isinstance(prediction, int) and 0 <= prediction < 7
    assert set(results) == set(paths) and all(isinstance(v, int) for v in results.values())
    assert results[paths[0]] == prediction
    batch = torch.stack([RAFTrainSet(raf["test_list"], raf["data_dir"])[i][0] for i in range(len(paths))])
    assert model.recognize(batch) == [results[p] for p in paths]
    # files and PIL images go through the handler's decoding and face step
    from_file = model.recognize(paths[0])
    assert isinstance(from_file, int) and 0 <= from_file < 7
    assert model.recognize(Image.open(paths[0])) == from_file


def test_seed_video_script(dirs, afew, caplog):
    with caplog.at_level(logging.WARNING, logger="training.sdk"):
        model, summary, result, prediction, results = seed_video_script(afew["list"], afew["data_dir"])
    assert "random initialisation" in caplog.text  # no weights in the (empty) folders
    assert model.task == "video" and model.spec.arch == "emo_video_hybrid"
    assert set(summary) == {"acc", "acc_top3", "best_epoch"} and summary["best_epoch"] == 1
    assert load_model(dirs["log"] / "video" / "best_video_model.pth").spec.task == "video"
    assert set(result) == {"acc", "acc_top3"} and 0.0 <= result["acc"] <= 1.0
    assert isinstance(prediction, int) and 0 <= prediction < 7
    folders = sorted(str(p) for p in afew["data_dir"].iterdir())
    assert sorted(results) == folders and all(0 <= v < 7 for v in results.values())
    clips = torch.stack([AFEWTrainSet(afew["list"], afew["data_dir"])[i][0] for i in range(2)])
    preds = model.recognize(clips)
    assert isinstance(preds, list) and len(preds) == 2
    # a video file, and a list of PIL frames, through the handler's decoding
    from .videoutil import encode
    frames = _moving_frames(afew["face"])
    video = dirs["log"] / "clip.mp4"
    video.write_bytes(encode(frames, "mp4"))
    from_file = model.recognize(video)
    assert isinstance(from_file, int) and 0 <= from_file < 7
    from_frames = model.recognize(frames)
    assert isinstance(from_frames, int) and 0 <= from_frames < 7
    # the decoded (lossy) file and the frames it was encoded from give nearly the same clip
    decoded, original = model._file_input(video), model._frames_input(frames)
    assert decoded.shape == original.shape == (1, 16, 48, 48)
    assert float((decoded - original).abs().mean()) < 0.1


# ------------------------------------------------------------------ the tensor convention

def test_seed_float_images_map_to_the_serving_preprocessing(dirs, raf):
    """A ToTensor() image in [0, 1] becomes what serving makes of the same picture."""
    r = EmotionRecognizer(video=False, pretrained=False)
    ds = RAFTrainSet(raf["train_list"], raf["data_dir"])
    x = torch.stack([ds[i][0] for i in range(4)])
    assert x.dtype == torch.float32 and x.shape == (4, 3, 100, 100)
    spec = r.spec.to_dict()
    served = torch.stack([to_uint8(Image.open(ds.images[i]).convert("RGB").resize((100, 100), Image.BILINEAR), spec)
                          for i in range(4)])
    ours = r.to_spec_uint8(x)
    side = r.spec.input_size
    assert ours.shape == served.shape == (4, 1, side, side) and ours.dtype == torch.uint8
    assert float((ours.float() - served.float()).abs().mean()) < 2.0  # grey levels of 255
    pil_input = torch.stack([to_model_input(Image.open(ds.images[i]).convert("RGB").resize((100, 100)), spec)
                             for i in range(4)])
    assert float((r.model_input(x) - pil_input).abs().mean()) < 0.02
    # uint8 pixels are the same picture as float/255
    assert torch.equal(r.to_spec_uint8((x * 255).round().to(torch.uint8)), ours)
    # a Normalize()-d tensor is not silently misread
    normalized = (x - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r.recognize(normalized[0])


def test_seed_clip_layout_is_put_back_in_frame_order(dirs, afew):
    r = Emotion_Recognize(Video=True, pretrain=False)
    ds = AFEWTrainSet(afew["list"], afew["data_dir"])
    random.seed(3)
    seed_clip, _ = ds[0]  # (3, 16, 224, 224) by reshape
    random.seed(3)
    frames = sorted(random.sample(range(18), 16))
    folder = Path(ds.images[0])
    names = sorted(p.name for p in folder.iterdir())
    proper = torch.stack([ds.transform(Image.open(folder / names[i])) for i in frames], dim=1)  # permuted
    assert seed_clip.shape == proper.shape == (3, 16, 224, 224)
    assert not torch.equal(seed_clip, proper)
    a, b = r.to_spec_uint8(seed_clip[None]), r.to_spec_uint8(proper[None])
    assert a.shape == (1, 1, 16, 48, 48)
    assert torch.equal(a, b)
    # a colour clip in true (3, T, H, W) order is left alone
    colour = torch.rand(1, 3, 16, 32, 32)
    assert torch.equal(seed_sdk.unscramble_seed_clips(colour), colour)
    # other clip lengths are resampled to the spec's 16 frames
    assert r.to_spec_uint8(torch.rand(2, 3, 40, 50, 50)).shape == (2, 1, 16, 48, 48)


# ------------------------------------------------------------------ constructor and weights

def test_seed_names_and_gpu_options(dirs):
    assert issubclass(Emotion_Recognize, EmotionRecognizer)
    assert EmotionRecognizer(pretrained=False).task == "video"  # the seed's default
    assert Emotion_Recognize(Video=False, pretrain=False).task == "image"
    with pytest.raises(TypeError, match="disagree"):
        Emotion_Recognize(video=True, Video=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        Emotion_Recognize(Video=False, pretrain=False, nGPU=2)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            EmotionRecognizer(video=False, pretrained=False, n_gpu=1)
    with pytest.raises(ValueError, match="unknown image model"):
        EmotionRecognizer(video=False, model="emo_video_hybrid")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_weights_are_found_in_the_seed_order(dirs, caplog):
    image = DEFAULT_MODEL["image"]
    shipped = create_model(image)
    save_weights(shipped, dirs["shipped"] / "emotion_image.pth")
    assert _same_weights(EmotionRecognizer(video=False).net, shipped)  # the shipped weights
    assert _same_weights(Emotion_Recognize(Video=False).net, shipped)  # no origin_pic_model.pth yet

    origin_path = dirs["pretrain"] / "origin_pic_model.pth"
    origin = create_model("emo_resnet_s")
    torch.save({"module." + k: v for k, v in origin.state_dict().items()}, origin_path)
    with pytest.raises(CheckpointError, match=f"does not fit '{image}'"):
        Emotion_Recognize(Video=False)  # a bare state_dict of another network than the default
    assert _same_weights(Emotion_Recognize(Video=False, model="emo_resnet_s").net, origin)  # DataParallel prefix

    save_weights(origin, origin_path)
    assert _same_weights(Emotion_Recognize(Video=False).net, origin)  # our checkpoint format: its spec decides
    assert _same_weights(EmotionRecognizer(video=False, weights=origin_path).net, origin)  # the new SDK's way
    with pytest.raises(CheckpointError, match="emo_resnet_s"):
        Emotion_Recognize(Video=False, model="dlp_cnn")  # the user's file is for another network

    origin_path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Emotion_Recognize(Video=False)

    # a video model without video weights starts its frame network from the image weights
    frames = create_model("emo_resnet_s")
    save_weights(frames, dirs["shipped"] / "emotion_image.pth")
    with caplog.at_level(logging.WARNING, logger="training.sdk"):
        v = EmotionRecognizer(video=True)
    assert "frame network starts from" in caplog.text
    assert _same_weights(v.net.frame_cnn, frames)


def test_predict_gives_calibrated_top3(dirs, raf):
    r = EmotionRecognizer(video=False, pretrained=False)
    x = torch.rand(2, 3, 100, 100)
    top = r.predict(x)
    assert len(top) == 2 and all(len(t) == 3 for t in top)
    assert [t[0][0] for t in top] == [LABELS[i] for i in r.recognize(x)]
    r.net.spec.extra["temperature"] = 2.0  # a calibrated model's probabilities are softer
    softer = r.predict(x[0])
    assert softer[0][0] == top[0][0][0] and softer[0][1] < top[0][0][1]


def test_target_order_maps_targets_and_answers(dirs):
    r = EmotionRecognizer(video=False, pretrained=False, target_order=seed_sdk.RAF_DB_ORDER)
    assert r.labels == list(seed_sdk.RAF_DB_ORDER)
    assert r._target(torch.tensor([0, 5, 6])).tolist() == [LABELS.index("surprise"), LABELS.index("angry"),
                                                            LABELS.index("neutral")]
    x = torch.rand(5, 3, 100, 100)
    ours = r.net(r.model_input(x)).argmax(-1).tolist()
    assert [r.labels[p] for p in r.recognize(x)] == [LABELS[p] for p in ours]
    with pytest.raises(ValueError, match="target_order"):
        EmotionRecognizer(video=False, pretrained=False, target_order=("happy",) * 7)
