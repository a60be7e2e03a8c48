"""``training.evaluate --task video``: the serving pipeline on labelled videos, per pooling."""
from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from handlers.video_handler import EmotionVideoHandler
from handlers.video_pool import pooling_from_spec
from model_defs import SHIPPED_WEIGHTS, load_checkpoint
from tests.handler_context import make_context, run_handler
from tests.test_video_frames import image_checkpoint
from tests.test_video_handler import video_checkpoint
from training.evaluate import get_args_parser, main as evaluate_main
from training.clip_datasets import label_from_name
from training.video_from_image import build

FIXTURES = Path(__file__).parent / "fixtures" / "video"
CLIPS = {"mead_happy_1s_128.mp4": "happy", "face_leaves_hevc_256x144.mov": "sad"}
LABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "labelled"


def test_labels_from_file_names():
    assert label_from_name("furious_talk2_clip3.mp4") == 0  # angry
    assert label_from_name("sadfather_clip1.mp4") == 5
    assert label_from_name("surprisegirl_clip2.mp4") == 6
    assert label_from_name("Obama_clip3.mp4") is None
    assert label_from_name("happy_or_sad.mp4") is None  # two emotions: not a label


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("veval")
    return build(image_checkpoint(tmp / "image.pth"), tmp / "video.pth", pooling="window")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labels.csv over the fixture clips."""
    d = tmp_path_factory.mktemp("vclips")
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "emotion"])
        for name, emotion in CLIPS.items():
            w.writerow([str(FIXTURES / name), emotion])
    return d


def test_evaluator_scores_as_the_handler_serves(weights, labelled, tmp_path):
    """Each pooling's prediction per clip is the served answer's top-1 with that pooling."""
    args = get_args_parser().parse_args(["--task", "video", "--data", str(labelled), "--weights", str(weights),
                                         "--pooling", "mean,window", "--device", "cpu"])
    out = evaluate_main(args)
    assert out["n"] == 2 and out["poolings"] == ["mean", "window"]
    assert set(out["results"]) == {"mean", "window"} and all(r["n"] == 2 for r in out["results"].values())
    assert [c["clip"] for c in out["clips"]] == list(CLIPS)
    assert [c["truth"] for c in out["clips"]] == list(CLIPS.values())
    assert export_main(["--task", "video", "--checkpoint", str(weights), "--out", str(tmp_path)]) == 0
    with zipfile.ZipFile(tmp_path / "emotion_video.mar") as z:
        z.extractall(tmp_path / "model")
    for pooling in ("mean", "window"):
        h = EmotionVideoHandler()
        h.initialize(make_context(tmp_path / "model", 1, {"pooling": pooling}))
        for row in out["clips"]:
            (answer,), status = run_handler(h, tmp_path / "model", [{"body": (FIXTURES / row["clip"]).read_bytes()}])
            assert status == [200] and answer["top3"][0]["label"] == row[pooling], (pooling, row, answer)
            assert answer["faces"]["sampled_frames"] == row["sampled"]


def test_a_clip_model_is_scored_by_its_own_pooling(labelled, tmp_path):
    ckpt = video_checkpoint(tmp_path / "hybrid.pth")
    args = get_args_parser().parse_args(["--task", "video", "--data", str(labelled), "--weights", str(ckpt)])
    out = evaluate_main(args)
    assert out["poolings"] == ["model"] and out["results"]["model"]["n"] == 2
    bad = get_args_parser().parse_args(["--task", "video", "--data", str(labelled), "--weights", str(ckpt),
                                        "--pooling", "window"])
    with pytest.raises(SystemExit, match="takes model"):
        evaluate_main(bad)


@pytest.mark.slow
@pytest.mark.skipif(not (LABELLED / "labels.csv").is_file(), reason=f"{LABELLED} not found (../shared/data is not here)")
def test_shipped_video_model_on_the_labelled_clips():
    """The shipped defaults on the 12 real clips: no worse than when they shipped (7/12, again
    with the stage-4 and stage-5 image weights of 2026-12-02; issue 13's target of 9/12 is not
    reached yet, see pretrain/MODEL_CARD.md), at least 5 classes predicted, no worse than the
    per-frame mean of the same frames, and keyframe tracking no worse than detection on every
    sampled frame."""
    pooling = pooling_from_spec(load_checkpoint(SHIPPED_WEIGHTS["video"])["spec"])[0]
    common = ["--task", "video", "--data", str(LABELLED), "--device", "cpu"]
    served = evaluate_main(get_args_parser().parse_args(common + ["--pooling", f"{pooling},mean"]))
    every = evaluate_main(get_args_parser().parse_args(common + ["--pooling", pooling, "--keyframe-every", "1"]))
    acc = served["results"][pooling]["acc"]
    assert round(acc * 12) >= 7, served["clips"]  # shipped 2026-12-01 and 2026-12-02: 7/12
    assert len({c[pooling] for c in served["clips"]}) >= 5
    assert acc >= served["results"]["mean"]["acc"]  # the per-frame baseline, same frames
    assert acc >= every["results"][pooling]["acc"]  # tracking vs detection on every sampled frame
