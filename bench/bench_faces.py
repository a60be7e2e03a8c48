"""Face detection + alignment + classification speed, printed as median milliseconds.

The handler's path (handlers/faces.py, then the TorchScript model from export.torchscript):
a 350x350 photo with one face, a 1920x1080 street frame with several faces (frame 30 of the
shared 1080p clip; without shared data, the fixture scaled up), and 8 frames of 640x360
detected one call each vs. one batched call (does batching pay?).

    .venv/bin/python -m bench.bench_faces [--weights W] [--threads 2] [--device cpu] [--repeat 5]

W defaults to pretrain/emotion_image.pth (random weights when absent: same speed).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from handlers import faces as F
from handlers.preprocess import to_model_input

ROOT = Path(__file__).resolve().parents[1]

PHOTOS = ROOT / "tests" / "fixtures" / "photos"
STREET = ROOT.parent / "shared" / "data" / "videos" / "unlabelled" / "facenet_pytorch_video.mp4"


def street_frame() -> tuple[Image.Image, str]:
    """Frame 30 of the 1080p street clip, or the (smaller) fixture cut from it, scaled up."""
    if not STREET.exists():
        print(f"note: {STREET} absent (no shared data): using the group fixture scaled up")
    else:
        import av
        with av.open(str(STREET)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i == 30:
                    return frame.to_image(), STREET.name
    img = Image.open(PHOTOS / "group.jpg").convert("RGB").resize((1920, 1080), Image.BICUBIC)
    return img, "tests/fixtures/photos/group.jpg scaled to 1920x1080"


def scripted_model(weights: Path, device: str):
    """TorchScript of the weights (as in the .mar) and its spec; random weights if absent."""
    import tempfile

    from export.torchscript import export_torchscript
    from model_defs import create_model, load_model

    if weights.is_file():
        model = load_model(weights)
    else:
        print(f"note: {weights} absent: random emo_resnet_s weights (same speed)")
        model = create_model("emo_resnet_s")
    spec = model.spec.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(model.eval(), spec, Path(tmp) / "model.pt")
        scripted = torch.jit.load(str(path), map_location=device).eval()
    return scripted, spec


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--weights", type=Path, default=ROOT / "pretrain" / "emotion_image.pth")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    det = F.FaceDetector(device=args.device)
    model, spec = scripted_model(args.weights, args.device)
    size, channels = int(spec["input_size"]), int(spec["channels"])

    def full(img):  # what the handler does per image: detect, align, classify all faces
        crops = F.faces_for_images([img], det, "auto", size, spec.get("face_margin"), channels)[0]
        with torch.inference_mode():
            return model(torch.stack([to_model_input(c.image, spec) for c in crops]).to(args.device))

    photo = Image.open(PHOTOS / "photo_tight.jpg").convert("RGB")
    street, source = street_frame()
    frame = Image.open(PHOTOS / "single_face.jpg").convert("RGB")
    frames = [frame.rotate(a) for a in range(-8, 8, 2)]
    print(f"device {args.device}, torch threads {args.threads}, median of {args.repeat}")

    for name, img in (("350x350 photo", photo), (f"{street.width}x{street.height} {source}", street)):
        faces = det.detect([img])[0]
        det_ms = median_ms(lambda: det.detect([img]), args.repeat)
        all_ms = median_ms(lambda: F.faces_for_images([img], det, "always", 48, 0, 1), args.repeat)
        align_ms = median_ms(lambda: [F.align_face(img, f, 48) for f in faces], args.repeat)
        full_ms = median_ms(lambda: full(img), args.repeat)
        print(f"{name}: {len(faces)} face(s); detect {det_ms:.1f} ms, align all {align_ms:.2f} ms, "
              f"detect+align (faces_for_images) {all_ms:.1f} ms, "
              f"detect+align+classify (auto) {full_ms:.1f} ms")

    one_by_one = median_ms(lambda: [det.detect([f]) for f in frames], args.repeat)
    batched = median_ms(lambda: det.detect(frames), args.repeat)
    print(f"8 frames 640x360: one call each {one_by_one:.1f} ms, one batched call {batched:.1f} ms "
          f"({one_by_one / batched:.2f}x)")


if __name__ == "__main__":
    main()
