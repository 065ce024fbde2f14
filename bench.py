"""Benchmarks: speed and memory of each part against an independent reference, measured in one run.

    python bench.py ot        # Sinkhorn vs POT and vs the exp-domain form (README "ot.py")
    python bench.py data      # augmentation pipelines vs a plain PIL + torchvision reference
    python bench.py quality   # GLCM / compression ratio vs scikit-image

Ratios, not absolute times, are the targets: both sides run on the same machine in the same process.
Nothing here is a test; tests never time anything.
"""
import argparse
import sys
import time


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


POT_TIMER = """
import sys, time, json, warnings
import torch, ot  # POT: this process runs outside the repository root, so `ot` is POT
log_p = torch.load(sys.argv[1], weights_only=True)  # (B, K, N)
B, K, N = log_p.shape
out = {}
for dtype in ("float32", "float64"):
    cost = [(-log_p[i].T).to(getattr(torch, dtype)).contiguous() for i in range(B)]  # (N, K) per image
    a, b = torch.full((N,), 1.0 / N, dtype=cost[0].dtype), torch.full((K,), 1.0 / K, dtype=cost[0].dtype)
    for iters in (3, 50):
        def run():  # POT solves one problem per call
            return [ot.sinkhorn(a, b, c, 0.05, numItermax=iters, stopThr=0.0, log=True)[1]["niter"] for c in cost]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns at numerical errors (float32) and at non-convergence
            ran = run()
            times = []
            for _ in range(int(sys.argv[2])):
                t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
        # POT stops early when its exp-domain scalings hit inf/NaN (niter = the failed iteration, whose update it
        # discards; a full run ends with niter = iters - 1): report the fewest iterations kept over the images
        kept = [n + 1 if n == iters - 1 else n for n in ran]
        out[f"{dtype}/{iters}"] = [sorted(times)[len(times) // 2], min(kept)]
print(json.dumps(out))
"""

PEAK_MEMORY = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from ot import sinkhorn
B, K, N = (int(v) for v in sys.argv[2:5])
log_p = torch.empty(B, K, N).normal_().mul_(4)
for i in range(B):  # one image at a time, so that making the input does not raise the peak itself
    log_p[i] = log_p[i].log_softmax(0)
def status(key):  # kB
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])
sinkhorn(log_p[:1, :, :64], scope="batch", class_marginal=sys.argv[5])  # one-time library set-up is not the call's
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set size (VmHWM) to the current one
before = status("VmRSS")
sinkhorn(log_p, scope="batch", class_marginal=sys.argv[5])
print((status("VmHWM") - before) * 1024 / (log_p.numel() * 4))
"""


def bench_ot(argv: list[str]) -> None:
    """ot.sinkhorn (default start, uniform and present marginals) against POT looped over images and the batched
    exp-domain form of the reference code; the exp-domain ratio is printed for each marginal."""
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import torch

    from ot import sinkhorn
    from tests.test_ot import reference_exp_domain

    parser = argparse.ArgumentParser(prog="bench.py ot")
    parser.add_argument("--batch", type=int, default=8, help="images per call (default: 8)")
    parser.add_argument("--side", type=int, default=130, help="pixels per image = side^2 (default: 130)")
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 150, 171], help="K values (default: 19 150 171)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, median reported (default: 7)")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent
    B, N = args.batch, args.side**2
    print(f"B={B} N={N} torch threads={torch.get_num_threads()}; times are medians of {args.repeats} calls")
    print("| K | iters | ours uniform (ms) | ours present (ms) | exp-domain (ms) | POT f32 (ms) [its run] | POT f64 (ms) "
          "| exp-domain / uniform | exp-domain / present | POT f32 / uniform | POT f64 / uniform |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    passes = {}
    for K in args.classes:
        # Segmentation-like teacher output: confident pixels, a few classes present.
        g = torch.Generator().manual_seed(K)
        logits = torch.randn(B, K, N, generator=g)
        label = torch.randint(min(K, 8), (B, N), generator=g)
        logits.scatter_add_(1, label[:, None], torch.full((B, 1, N), 8.0))
        log_p = logits.log_softmax(1)  # (B, K, N)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(log_p, Path(tmp) / "log_p.pt")
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            pot = json.loads(subprocess.run([sys.executable, "-c", POT_TIMER, "log_p.pt", str(args.repeats)], cwd=tmp,
                                            env=env, check=True, capture_output=True, text=True).stdout)
        row_time = {}
        for iters in (3, 50):
            t_uni = median_time(lambda: sinkhorn(log_p, iters=iters, scope="batch"), args.repeats)
            t_pre = median_time(lambda: sinkhorn(log_p, iters=iters, scope="batch", class_marginal="present"), args.repeats)
            t_ref = median_time(lambda: reference_exp_domain(log_p, iters=iters), args.repeats)
            (t_pot32, ran32), (t_pot64, _) = pot[f"float32/{iters}"], pot[f"float64/{iters}"]
            row_time[iters] = t_uni
            print(f"| {K} | {iters} | {t_uni * 1e3:.1f} | {t_pre * 1e3:.1f} | {t_ref * 1e3:.1f} | {t_pot32 * 1e3:.1f} "
                  f"[{ran32}] | {t_pot64 * 1e3:.1f} | {t_ref / t_uni:.2f}x | {t_ref / t_pre:.2f}x | {t_pot32 / t_uni:.2f}x "
                  f"| {t_pot64 / t_uni:.2f}x |")
        x = log_p.transpose(1, 2).contiguous()  # (B, N, K)
        t_pass = median_time(lambda: x.sum(), args.repeats)
        passes[K] = (row_time[50] - row_time[3]) / 47 / t_pass
    print()
    print("| K | one iteration, in read passes over (B, N, K) | peak extra memory, uniform / present (float32 copies of the input) |")
    print("| --- | --- | --- |")
    for K in args.classes:
        peak = [float(subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(root), str(B), str(K), str(N), m],
                                     check=True, capture_output=True, text=True).stdout) for m in ("uniform", "present")]
        print(f"| {K} | {passes[K]:.2f} | {peak[0]:.2f} / {peak[1]:.2f} |")
    print("\nPeak memory: peak resident set size (VmHWM, reset through /proc/self/clear_refs) of a fresh process during")
    print("one call, minus its resident size before the call, in units of the input's size in float32; a call on a")
    print("64-pixel slice first, so that torch's one-time set-up is not counted.")


def bench_quality(argv: list[str]) -> None:
    """Images/s of quality.glcm_features vs scikit-image graycomatrix + graycoprops looped per image, and of
    quality.compression_ratio (JPEG) vs PNG, on real-photograph tiles at 1024x2048 (skimage.data.astronaut)."""
    import io
    import math

    import numpy as np
    import torch
    from PIL import Image
    from skimage import data as skdata
    from skimage.feature import graycomatrix, graycoprops

    import quality

    parser = argparse.ArgumentParser(prog="bench.py quality")
    parser.add_argument("--height", type=int, default=1024, help="image height (default: 1024)")
    parser.add_argument("--width", type=int, default=2048, help="image width (default: 2048)")
    parser.add_argument("--batch", type=int, default=4, help="images per call (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    parser.add_argument("--device", default="cpu", help="device of the torch side (default: cpu)")
    args = parser.parse_args(argv)

    # Tiles of a real photograph keep natural-image grey-level statistics at full resolution.
    photo = skdata.astronaut()  # (512, 512, 3) uint8
    reps = (math.ceil(args.height / photo.shape[0]), math.ceil(args.width / photo.shape[1]), 1)
    rgb = np.tile(photo, reps)[:args.height, :args.width]  # (H, W, 3)
    rgb = torch.from_numpy(rgb).permute(2, 0, 1)[None].repeat(args.batch, 1, 1, 1).contiguous()  # (B, 3, H, W)
    grey = quality.to_grey(rgb)  # (B, H, W), both sides start from the same grey images
    angles = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
    device = torch.device(args.device)
    grey_device, rgb_device = grey.to(device), rgb.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def torch_glcm(threads: int):
        def run() -> None:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                quality.glcm_features(grey_device, 256, (1,), angles)
                sync()
            finally:
                torch.set_num_threads(previous)
        return run

    def skimage_glcm() -> None:
        for image in grey.numpy():
            matrix = graycomatrix(image, [1], angles, levels=256, symmetric=True, normed=True)
            [graycoprops(matrix, name).mean() for name in quality.GLCM_STATS]

    def png_bytes() -> None:
        Image.fromarray(rgb[0].permute(1, 2, 0).numpy()).save(io.BytesIO(), format="PNG")

    threads = torch.get_num_threads()
    # The three GLCM runs take turns within each repeat, so load from other jobs on a shared machine
    # falls on all of them alike.
    runs = {"reference": skimage_glcm, "torch": torch_glcm(threads), "torch_1": torch_glcm(1)}
    times = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if repeat:  # the first round is the warm-up
                times[name].append(time.perf_counter() - t0)
    t_reference, t_torch, t_torch_1 = (sorted(times[name])[len(times[name]) // 2] / args.batch for name in runs)
    t_grey = median_time(lambda: (quality.to_grey(rgb_device), sync()), args.repeats) / args.batch
    t_jpeg = median_time(lambda: quality.compression_ratio(rgb_device), args.repeats) / args.batch
    t_png = median_time(png_bytes, 1)
    print(f"quality metrics at {args.height}x{args.width}, batch {args.batch}, torch {args.device}, "
          f"{threads} threads (median of {args.repeats})")
    print("| metric | images/s | vs reference |")
    print("| --- | ---: | ---: |")
    print(f"| GLCM, scikit-image graycomatrix + graycoprops per image (reference) | {1 / t_reference:.1f} | 1.00x |")
    print(f"| GLCM, quality.glcm_features ({threads} threads) | {1 / t_torch:.1f} | {t_reference / t_torch:.2f}x |")
    print(f"| GLCM, quality.glcm_features (1 thread) | {1 / t_torch_1:.1f} | {t_reference / t_torch_1:.2f}x |")
    print(f"| grey conversion, quality.to_grey (RGB input adds this) | {1 / t_grey:.0f} | |")
    print(f"| compression ratio, PNG (reference) | {1 / t_png:.2f} | 1.00x |")
    print(f"| compression ratio, quality.compression_ratio (JPEG q{quality.JPEG_QUALITY}) | {1 / t_jpeg:.1f} | "
          f"{t_png / t_jpeg:.0f}x |")


def bench_data(argv: list[str]) -> None:
    """Samples/s of data.py's labelled and synthetic pipelines vs a plain PIL + torchvision-v1 reference doing the
    same steps (rescale, pad, crop, flip, normalise; strong view: jitter, grayscale, blur), one thread as in a
    DataLoader worker, at Cityscapes (2048×1024 PNG, crop 798) and ADE20K (683×512 JPEG, crop 518) sizes.
    Both sides draw the same random parameters from the same torch seed, so their outputs are compared directly."""
    import random
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageFilter

    import data

    parser = argparse.ArgumentParser(prog="bench.py data")
    parser.add_argument("--samples", type=int, default=16, help="samples per pipeline and side (default: 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # DataLoader workers run single-threaded
    random.seed(0)
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD

    def uniform(low, high):
        return low + (high - low) * torch.rand(()).item()

    def reference_geometry(image, label, crop):  # PIL resize of the whole image, then pad, crop, flip
        width, height = image.size
        long_side = max(int(max(width, height) * uniform(*data.SCALE_RANGE) + 0.5), 1)
        if width >= height:
            size = (max(int(height * long_side / width + 0.5), 1), long_side)
        else:
            size = (long_side, max(int(width * long_side / height + 0.5), 1))
        image = TF.resize(image, list(size), T.InterpolationMode.BILINEAR)
        label = TF.resize(label, list(size), T.InterpolationMode.NEAREST)
        pad = [0, 0, max(crop - size[1], 0), max(crop - size[0], 0)]
        image, label = TF.pad(image, pad, fill=0), TF.pad(label, pad, fill=255)
        left = int(torch.randint(0, max(size[1] - crop, 0) + 1, ()))
        top = int(torch.randint(0, max(size[0] - crop, 0) + 1, ()))
        image, label = TF.crop(image, top, left, crop, crop), TF.crop(label, top, left, crop, crop)
        if torch.rand(()).item() < data.FLIP_P:
            image, label = TF.hflip(image), TF.hflip(label)
        return image, label

    jitter = T.RandomApply([T.ColorJitter(*data.JITTER)], p=data.JITTER_P)
    grayscale = T.RandomGrayscale(p=data.GRAYSCALE_P)

    def reference_labelled(image_path, label_path, crop, lut):
        image, label = reference_geometry(Image.open(image_path).convert("RGB"), Image.open(label_path), crop)
        target = torch.from_numpy(lut[np.array(label)].astype(np.int64))
        return TF.normalize(TF.to_tensor(image), mean, std), target

    def reference_synthetic(image_path, crop):
        image = Image.open(image_path).convert("RGB")
        image, padding = reference_geometry(image, Image.new("L", image.size, 0), crop)
        strong = grayscale(jitter(image))
        if torch.rand(()).item() < data.BLUR_P:
            strong = strong.filter(ImageFilter.GaussianBlur(radius=uniform(*data.BLUR_SIGMA)))
        return (TF.normalize(TF.to_tensor(image), mean, std), TF.normalize(TF.to_tensor(strong), mean, std),
                torch.from_numpy(np.array(padding)) == 255, data.cutmix_box(crop))

    def scene(size, seed):  # toy scene upsampled to the benchmark size, with photo-like noise
        image, label = data.render_toy_scene(np.random.default_rng(seed), data.TOY_SPLITS["train"])
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)).astype(np.float32)
        noise = np.random.default_rng(seed).normal(0, 3, image.shape)
        return np.clip(image + noise, 0, 255).astype(np.uint8), np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for index in range(3):
            image, label = scene((2048, 1024), index)
            stem = f"bench_000000_{index:06d}"
            (root / "cs/leftImg8bit/train/bench").mkdir(parents=True, exist_ok=True)
            (root / "cs/gtFine/train/bench").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / f"cs/leftImg8bit/train/bench/{stem}_leftImg8bit.png")
            Image.fromarray(label).save(root / f"cs/gtFine/train/bench/{stem}_gtFine_labelTrainIds.png")
            image, label = scene((683, 512), index)
            (root / "ade/images/training").mkdir(parents=True, exist_ok=True)
            (root / "ade/annotations/training").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / f"ade/images/training/ADE_train_{index:08d}.jpg", quality=90)
            Image.fromarray(label).save(root / f"ade/annotations/training/ADE_train_{index:08d}.png")
        setups = [("cityscapes", root / "cs", root / "cs/leftImg8bit", 798, None),
                  ("ade20k", root / "ade", root / "ade/images", 518, data.REDUCE_ZERO_LUT)]
        print(f"data pipelines, samples/s on one thread ({args.samples} samples per side, same random draws)")
        print(f"{'dataset':<11}{'pipeline':<11}{'ours':>7}{'ref':>7}{'ratio':>7}   "
              f"{'mean ours/ref':>15}{'std ours/ref':>15}{'|diff| /255':>12}")
        for name, dataset_root, synthetic_root, crop, lut in setups:
            labelled = data.LabelledDataset(name, dataset_root, "train", crop_size=crop)
            synthetic = data.SyntheticDataset(synthetic_root, crop_size=crop)
            identity = np.arange(256, dtype=np.uint8)
            pipelines = {
                "labelled": (lambda i: labelled[i % 3],
                             lambda i: reference_labelled(*labelled.samples[i % 3], crop,
                                                          lut if lut is not None else identity)),
                "synthetic": (lambda i: synthetic[i % 3], lambda i: reference_synthetic(synthetic.images[i % 3], crop)),
            }
            for pipeline, (ours, reference) in pipelines.items():
                timings, outputs = {"ours": 0.0, "ref": 0.0}, {"ours": [], "ref": []}
                for side, fn in (("ours", ours), ("ref", reference)) * 2:  # interleaved halves: fair under load
                    torch.manual_seed(len(outputs[side]))
                    start = time.perf_counter()
                    for i in range(len(outputs[side]), len(outputs[side]) + args.samples // 2):
                        outputs[side].append(fn(i))
                    timings[side] += time.perf_counter() - start
                views = [0, 1] if pipeline == "synthetic" else [0]
                stats = []
                for side in ("ours", "ref"):
                    pixels = []
                    for item in outputs[side]:
                        valid = (item[1] != 255) if pipeline == "labelled" else ~item[2]  # (c, c)
                        pixels += [item[v][:, valid] for v in views]
                    pixels = torch.cat([p.flatten() for p in pixels])
                    stats.append((pixels.mean().item(), pixels.std().item()))
                difference = np.mean([
                    np.abs(data.denormalize(a[v]).astype(float) - data.denormalize(b[v]).astype(float)).mean()
                    for a, b in zip(outputs["ours"], outputs["ref"]) for v in views])
                rate = {side: args.samples / timings[side] for side in timings}
                print(f"{name:<11}{pipeline:<11}{rate['ours']:>7.1f}{rate['ref']:>7.1f}{rate['ours'] / rate['ref']:>6.2f}×"
                      f"   {stats[0][0]:>7.3f}/{stats[1][0]:<7.3f}{stats[0][1]:>7.3f}/{stats[1][1]:<7.3f}{difference:>10.2f}")


BENCHES = {}
BENCHES["ot"] = bench_ot
BENCHES["quality"] = bench_quality
BENCHES["data"] = bench_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args()
    BENCHES[args.which](rest)


if __name__ == "__main__":
    sys.exit(main())
