"""Datasets, the training engine (loss goes down, resume restores state), the LP loss and the
evaluation CLI, on tiny data built from the committed face fixtures."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model_defs import DEFAULT_MODEL, LABELS, create_model, load_checkpoint, load_model, save_weights
from handlers.preprocess import to_uint8
from training.datasets import CsvImageDataset, ImageFolderDataset, ListFileDataset, cache_in_memory, image_dataset
from training.engine import FitConfig, evaluate_model, fit, prepare_batch
from training.augment import AugmentConfig, train_batch
from training.losses import locality_preserving_loss

REPO = Path(__file__).resolve().parents[1]
FACES = REPO / "tests" / "fixtures" / "faces"
SPEC = create_model("emo_resnet_s").spec.to_dict()


def _fixture_files() -> list[tuple[Path, str]]:
    return [(f, d.name) for d in sorted(FACES.iterdir()) for f in sorted(d.glob("*.jpg"))]


@pytest.fixture
def odd_formats_tree(tmp_path: Path) -> Path:
    """An ImageFolder with some classes missing and PNG/BMP/palette-TIFF/colour files."""
    root = tmp_path / "tree"
    for i, (f, label) in enumerate(_fixture_files()):
        if label in ("disgust", "fear"):
            continue  # missing classes are allowed
        (root / label).mkdir(parents=True, exist_ok=True)
        img = Image.open(f)
        fmt = ["JPEG", "PNG", "BMP", "TIFF"][i % 4]
        if fmt == "TIFF":
            img = img.convert("P")  # palette TIFF
        elif i % 3 == 0:
            img = img.convert("RGB")
        img.save(root / label / f"{f.stem}.{fmt.lower()}", format=fmt)
    (root / "contempt").mkdir()  # unknown class folder: skipped
    return root


def test_image_folder_reads_every_format_and_allows_missing_classes(odd_formats_tree: Path):
    ds = ImageFolderDataset(odd_formats_tree, SPEC)
    assert len(ds) == 10
    counts = ds.class_counts()
    assert counts[LABELS.index("disgust")] == 0 and counts[LABELS.index("happy")] == 2
    x, y = ds[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 48, 48)
    assert LABELS[y] == "angry"


def test_list_file_zero_and_one_based(tmp_path: Path):
    files = _fixture_files()
    for name, offset in (("zero.txt", 0), ("one.txt", 1)):
        (tmp_path / name).write_text("".join(
            f"{f.relative_to(FACES)} {LABELS.index(lab) + offset}\n" for f, lab in files))
    zero = ListFileDataset(FACES, tmp_path / "zero.txt", SPEC)
    one = ListFileDataset(FACES, tmp_path / "one.txt", SPEC, one_based=True)
    assert zero.labels == one.labels == [LABELS.index(lab) for _, lab in files]
    with pytest.raises(ValueError, match="one_based"):
        ListFileDataset(FACES, tmp_path / "one.txt", SPEC)  # label 7 without the flag


def test_csv_dataset(tmp_path: Path):
    (tmp_path / "images").mkdir()
    rows = ["image,emotion"]
    for f, lab in _fixture_files()[:4]:
        shutil.copy(f, tmp_path / "images" / f.name)
        rows.append(f"{f.name},{'anger' if lab == 'angry' else lab}")
    rows.append("missing.jpg,contempt")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = image_dataset(tmp_path, SPEC)
    assert isinstance(ds, CsvImageDataset) and len(ds) == 4 and ds.labels[0] == LABELS.index("angry")


def test_augmentation_keeps_shape_and_soft_targets_sum_to_one():
    x = torch.randint(0, 256, (8, 1, 48, 48), dtype=torch.uint8)
    y = torch.arange(8) % 7
    xa, t = train_batch(x, y, SPEC, AugmentConfig(mixup=0.4, cutmix=1.0, mix_prob=1.0), 7)
    assert xa.shape == (8, 1, 48, 48) and xa.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(8))


def test_lp_loss_pulls_same_class_neighbours():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = locality_preserving_loss(f, y, k=1)
    assert loss.item() == pytest.approx(0.5)  # each point is 1 away from its only neighbour
    loss.backward()
    assert f.grad[0, 0] < 0 < f.grad[1, 0]  # moves the pair together
    assert locality_preserving_loss(f, torch.tensor([0, 1, 2, 3]), k=1).item() == 0.0


def _loaders(batch: int = 7):
    ds = cache_in_memory(ImageFolderDataset(FACES, SPEC))
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True), DataLoader(ds, batch_size=14)


def _batch_stat_loss(model, loader) -> float:
    """Loss with batch statistics (12 steps are too few for BatchNorm's running averages)."""
    x, y = next(iter(loader))
    model.train()
    with torch.no_grad():
        out = model(prepare_batch(x, SPEC))
    model.eval()
    return torch.nn.functional.cross_entropy(out, y).item()


def test_fit_lowers_loss_and_keeps_best(tmp_path: Path):
    torch.manual_seed(0)
    train, val = _loaders()
    model = create_model("emo_resnet_s")
    before = _batch_stat_loss(model, val)
    cfg = FitConfig(epochs=6, lr=0.01, optimizer="adamw", output_dir=str(tmp_path),
                    augment=AugmentConfig(rotate=0, scale=(1, 1), translate=0, erase=0, brightness=0, contrast=0))
    res = fit(model, train, val, cfg)
    assert _batch_stat_loss(model, val) < before
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    best = load_checkpoint(tmp_path / "best.pth")
    assert best["metrics"]["best_epoch"] == res["best_epoch"]
    assert best["metrics"]["acc"] == pytest.approx(max(h["acc"] for h in res["history"]))
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())


def test_resume_restores_model_optimizer_scheduler_and_best(tmp_path: Path):
    torch.manual_seed(0)
    train, val = _loaders()
    model = create_model("emo_resnet_s")
    fit(model, train, val, FitConfig(epochs=2, lr=0.01, output_dir=str(tmp_path)))
    ck2 = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck2["epoch"] == 2 and len(ck2["history"]) == 2
    resumed = create_model("emo_resnet_s")
    res = fit(resumed, train, val, FitConfig(epochs=3, lr=0.01, output_dir=str(tmp_path), resume=True))
    ck3 = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ck3["epoch"] == 3 and [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert ck3["history"][:2] == ck2["history"]
    assert ck3["scheduler"]["last_epoch"] == 3 * len(train)  # continued, not restarted
    assert ck3["best"]["acc"] >= ck2["best"]["acc"]


def test_eval_initial_records_epoch_zero(tmp_path: Path):
    train, val = _loaders()
    res = fit(create_model("emo_resnet_s"), train, val,
              FitConfig(epochs=1, lr=1e-9, output_dir=str(tmp_path), eval_initial=True))
    assert res["history"][0]["epoch"] == 0
    assert res["best_epoch"] in (0, 1)


def test_evaluate_cli_prints_json_last_line(tmp_path: Path, odd_formats_tree: Path):
    weights = tmp_path / "w.pth"
    save_weights(create_model("emo_resnet_s"), weights)
    out = subprocess.run([sys.executable, "-m", "training.evaluate", "--task", "image", "--data",
                          str(odd_formats_tree), "--weights", str(weights), "--workers", "0"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 10 and 0 <= res["acc"] <= res["acc_top3"] <= 1
    assert set(res["per_class"]) == set(LABELS) and res["per_class"]["disgust"] is None
    # the same numbers as the engine on the same data (one preprocessing path)
    direct = evaluate_model(load_model(weights), DataLoader(ImageFolderDataset(odd_formats_tree, SPEC), batch_size=4))
    assert res["acc"] == pytest.approx(direct["acc"]) and res["confusion"] == direct["confusion"]


def test_train_cli_smoke_and_resume(tmp_path: Path):
    out_dir = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(FACES, data / "train")
    shutil.copytree(FACES, data / "val")
    cmd = [sys.executable, "-m", "training.run", "--task", "image", "--data", str(data), "--epochs", "1",
           "-b", "7", "--workers", "0", "--output-dir", str(out_dir), "--threads", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    r = subprocess.run(cmd[:8] + ["2"] + cmd[9:] + ["--resume"], cwd=REPO, check=True, capture_output=True, text=True)
    assert "resumed from" in r.stderr
    assert load_checkpoint(out_dir / "checkpoint.pth")["epoch"] == 2
    assert load_model(out_dir / "best.pth").spec.arch == DEFAULT_MODEL["image"]


def test_train_cli_fine_tunes_at_another_input_size(tmp_path: Path):
    """--input-size: the network's spec (and so its data, checkpoint and export) at a new side,
    from --init weights of the network's own size."""
    data = tmp_path / "data"
    shutil.copytree(FACES, data / "train")
    shutil.copytree(FACES, data / "val")
    torch.manual_seed(0)
    save_weights(create_model("emo_resnet_s"), tmp_path / "start.pth")
    subprocess.run([sys.executable, "-m", "training.run", "--task", "image", "--model", "emo_resnet_s",
                    "--data", str(data), "--epochs", "1", "-b", "7", "--workers", "0", "--threads", "1",
                    "--init", str(tmp_path / "start.pth"), "--input-size", "56",
                    "--output-dir", str(tmp_path / "run")], cwd=REPO, check=True, capture_output=True)
    tuned = load_model(tmp_path / "run" / "best.pth")
    assert tuned.spec.input_size == 56 and create_model("emo_resnet_s").spec.input_size == 48
    assert tuned(torch.zeros(2, 1, 56, 56)).shape == (2, len(LABELS))


def test_flip_averaging_is_what_export_compiles_in(tmp_path: Path):
    """A spec with extra.tta_flip: the exported TorchScript gives the mirror-averaged
    probabilities, exactly as training.engine scores the eager model."""
    from export.torchscript import export_torchscript, load_scripted
    from training.engine import predict_logits

    torch.manual_seed(0)
    model = create_model("emo_resnet_s").eval()
    with torch.no_grad():  # peaky outputs, so that the mirror's answer differs visibly
        model.fc.weight.mul_(200.0)
    model.spec.extra["tta_flip"] = True
    scripted, _ = load_scripted(export_torchscript(model, model.spec.to_dict(), tmp_path / "m.pt"))
    x = torch.randn(5, 1, 48, 48)
    with torch.inference_mode():
        want = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
        served = scripted(x).softmax(-1)
        evaluated = predict_logits(model, x, tta_flip=True).softmax(-1)
        plain = model(x).softmax(-1)
    assert torch.allclose(served, want, atol=1e-5) and torch.allclose(evaluated, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the mirror really changes the answer


def test_fit_temperature_recovers_an_overconfident_model():
    from training.calibrate import fit_temperature
    from training.metrics import expected_calibration_error

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 7, generator=g) * 1.5
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)  # z is calibrated by construction
    t = fit_temperature(z * 3.0, labels)  # a model three times too sure of itself
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error((z * 3.0 / t).softmax(-1), labels) < 0.5 * expected_calibration_error(
        (z * 3.0).softmax(-1), labels)


def test_calibrate_stores_a_temperature_that_export_and_evaluation_apply(tmp_path: Path):
    from export.torchscript import export_torchscript, load_scripted
    from training.calibrate import get_args_parser, main as calibrate
    from training.engine import predict_logits

    torch.manual_seed(0)
    model = create_model("emo_resnet_s")
    with torch.no_grad():  # overconfident: calibration must soften it
        model.fc.weight.mul_(50.0)
    save_weights(model, tmp_path / "w.pth")
    faces = Path(__file__).parent / "fixtures" / "faces"
    png = tmp_path / "rel.png"
    out = calibrate(get_args_parser().parse_args(
        ["--weights", str(tmp_path / "w.pth"), "--data", str(faces), "--out", str(tmp_path / "c.pth"),
         "--tta-flip", "auto", "-j", "0", "--reliability-png", str(png)]))
    assert out["temperature"] > 1 and out["ece_after"] <= out["ece_before"]
    assert out["nll_after"] <= out["nll_before"] and png.stat().st_size > 1000
    calibrated = load_model(tmp_path / "c.pth")
    assert calibrated.spec.extra["temperature"] == pytest.approx(out["temperature"])
    assert bool(calibrated.spec.extra.get("tta_flip")) == out["tta_flip"]
    assert "input_blur" not in calibrated.spec.extra
    calibrated.spec.extra.pop("tta_flip", None)
    scripted, spec = load_scripted(export_torchscript(calibrated, calibrated.spec.to_dict(), tmp_path / "m.pt"))
    x = torch.randn(5, 1, 48, 48)
    with torch.inference_mode():
        want = (model.eval()(x) / out["temperature"]).softmax(-1)
        served, evaluated = scripted(x).softmax(-1), predict_logits(calibrated, x).softmax(-1)
    assert torch.allclose(served, want, atol=1e-5) and torch.allclose(evaluated, want, atol=1e-5)
    assert not torch.allclose(model(x).softmax(-1), want, atol=1e-3)


def test_class_bias_undoes_a_shift_of_the_class_priors():
    """A model trained toward other class priors (its logits offset per class) is recalibrated
    by bias-corrected temperature scaling: the fitted offset cancels the shift, the top-1 answer
    recovers, and the held-out (2-fold) figures say so too; without --class-bias the offset is 0."""
    from training.calibrate import crossval, fit_calibration

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6000, 7, generator=g) * 2.0
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)  # z is calibrated by construction
    shift = torch.tensor([-0.6, 0.3, -0.8, 0.5, 0.9, -0.4, 0.1])
    shifted = (z + shift) * 1.5  # other priors, and too sure of itself
    t, bias = fit_calibration(shifted, labels, class_bias=True)
    assert t == pytest.approx(1.5, rel=0.1)
    assert torch.allclose(bias, -(shift - shift.mean()), atol=0.15)
    acc = lambda lg: float((lg.argmax(-1) == labels).float().mean())  # noqa: E731
    assert acc(shifted / t + bias) > acc(shifted) + 0.02
    held_out = crossval(shifted, labels, class_bias=True)
    assert held_out["acc"] > acc(shifted) + 0.02 and held_out["acc"] <= acc(z) + 0.02
    _, no_bias = fit_calibration(shifted, labels)
    assert not no_bias.any() and crossval(shifted, labels)["acc"] == pytest.approx(acc(shifted))


def test_calibrate_class_bias_is_stored_and_served(tmp_path: Path):
    from export.torchscript import export_torchscript, load_scripted
    from training.calibrate import get_args_parser, main as calibrate
    from training.engine import predict_logits

    torch.manual_seed(0)
    model = create_model("emo_resnet_s")
    with torch.no_grad():  # a strong prior for one class: the offset must pull it back
        model.fc.bias[LABELS.index("happy")] += 3.0
    save_weights(model, tmp_path / "w.pth")
    faces = Path(__file__).parent / "fixtures" / "faces"
    out = calibrate(get_args_parser().parse_args(
        ["--weights", str(tmp_path / "w.pth"), "--data", str(faces), "--out", str(tmp_path / "c.pth"),
         "--class-bias", "-j", "0"]))
    bias = torch.tensor(out["class_bias"])
    assert int(bias.argmin()) == LABELS.index("happy") and bias.min() < -0.5 and abs(float(bias.sum())) < 1e-4
    assert out["nll_after"] < out["nll_before"] and 0 <= out["acc_2fold"] <= 1
    calibrated = load_model(tmp_path / "c.pth")
    assert calibrated.spec.extra["class_bias"] == pytest.approx(out["class_bias"])
    scripted, _ = load_scripted(export_torchscript(calibrated, calibrated.spec.to_dict(), tmp_path / "m.pt"))
    x = torch.randn(5, 1, 48, 48)
    with torch.inference_mode():
        want = (model.eval()(x) / out["temperature"] + bias).softmax(-1)
        served, evaluated = scripted(x).softmax(-1), predict_logits(calibrated, x).softmax(-1)
    assert torch.allclose(served, want, atol=1e-5) and torch.allclose(evaluated, want, atol=1e-5)
    recalibrate = lambda w, out: calibrate(get_args_parser().parse_args(  # noqa: E731
        ["--weights", str(w), "--data", str(faces), "--out", str(out), "-j", "0"]))
    plain, again = recalibrate(tmp_path / "w.pth", tmp_path / "p.pth"), recalibrate(tmp_path / "c.pth", tmp_path / "d.pth")
    assert again["temperature"] == pytest.approx(plain["temperature"], rel=1e-4)  # from the raw logits again
    assert "class_bias" not in load_model(tmp_path / "d.pth").spec.extra


def test_degradations_match_their_settings():
    from training.augment import AugmentConfig, degrade, jpeg_round_trip

    torch.manual_seed(0)
    faces = torch.stack([to_uint8(Image.open(p), SPEC) for p in sorted(FACES.rglob("*.jpg"))[:8]])
    off = AugmentConfig(rescale=0, jpeg=0, blur=0, gamma=0)
    assert torch.equal(degrade(faces, off), faces.float() / 255)  # nothing asked, nothing changed
    small = degrade(faces, AugmentConfig(rescale=1, rescale_px=(12, 12), jpeg=0, blur=0, gamma=0))
    sharp = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert sharp(small) < 0.6 * sharp(faces.float() / 255)  # a 12 px face has lost its detail
    q20 = jpeg_round_trip(faces[0], 20)
    assert q20.shape == faces[0].shape and 0 < (q20.float() - faces[0].float()).abs().mean() < 20
    dark = degrade(faces, AugmentConfig(rescale=0, jpeg=0, blur=0, gamma=1, gamma_range=(1.5, 1.5)))
    assert torch.allclose(dark, (faces.float() / 255).clamp_min(1e-6) ** 1.5, atol=1e-5)


def test_ferplus_votes_give_soft_targets_and_majority_labels(tmp_path: Path):
    from training.ferplus import majority_label, read_votes, soft_targets, with_ferplus_majority

    files = sorted((FACES / "happy").glob("*.jpg")) + sorted((FACES / "sad").glob("*.jpg"))
    cols = "file,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"
    rows = [f"train/happy/{files[0].name},2,8,0,0,0,0,0,0,0,0",   # happy majority
            f"train/happy/{files[1].name},5,5,0,0,0,0,0,0,0,0",   # a tie: dropped
            f"train/sad/{files[-1].name},0,0,0,3,0,0,0,0,0,7"]    # not a face: dropped, no soft target
    (tmp_path / "votes.csv").write_text("\n".join([cols, *rows]) + "\n")
    votes = read_votes(tmp_path / "votes.csv")
    assert majority_label(votes[files[0].name]) == LABELS.index("happy")
    assert majority_label(votes[files[1].name]) is None and majority_label(votes[files[-1].name]) is None
    labels = [LABELS.index("neutral"), LABELS.index("happy"), LABELS.index("sad")]
    t = soft_targets([files[0], files[1], files[-1]], labels, votes, label_weight=0.5)
    assert t[0, LABELS.index("neutral")] == pytest.approx(0.5 + 0.5 * 0.2)
    assert t[0, LABELS.index("happy")] == pytest.approx(0.5 * 0.8)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[2, LABELS.index("sad")] == pytest.approx(0.5 + 0.5)  # NF votes are not emotions
    ds = with_ferplus_majority(ImageFolderDataset(FACES, SPEC), votes)
    assert ds.files == [files[0]] and ds.labels == [LABELS.index("happy")]


def test_lp_loss_on_the_video_model_refuses_with_a_clear_message(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "training.run", "--task", "video", "--data", str(tmp_path),
                        "--lp-loss", "0.003", "--output-dir", str(tmp_path / "run")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--lp-loss 0.003" in r.stderr and "emo_video_hybrid" in r.stderr and "Traceback" not in r.stderr


def test_imagenet_start_folds_the_rgb_stem_to_grey():
    import torchvision
    from model_defs.image_nets import imagenet_mobilenet_v2_state

    state = imagenet_mobilenet_v2_state()  # from the installed wheel; nothing is downloaded
    net = create_model("emo_mobilenet_v2", pretrained=True)
    assert torch.allclose(net.features[0][0].weight, state["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(net.features[5].conv[1][0].weight, state["features.5.conv.1.0.weight"])
    # a grey picture copied to RGB gives the same first-layer output as the folded stem
    rgb_stem = torchvision.models.mobilenet_v2().features[0][0]
    rgb_stem.weight.data.copy_(state["features.0.0.weight"])
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(rgb_stem(x.expand(-1, 3, -1, -1)), net.features[0][0](x), atol=1e-5)
    assert create_model("emo_mobilenet_v2").features[0][0].weight.abs().sum() != net.features[0][0].weight.abs().sum()
