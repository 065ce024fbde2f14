"""Benchmarks: speed and memory of each part against an independent reference, measured in one run.

    python bench.py ot        # Sinkhorn vs POT and vs the exp-domain form (docs/ot.md)
    python bench.py data      # augmentation pipelines vs a plain PIL + torchvision reference
    python bench.py quality   # GLCM / compression ratio vs scikit-image
    python bench.py gpu       # every GPU figure in one table (--device cpu --tiny: the same code on a CPU)
    python bench.py train     # the toy default training step, part by part, with its FLOPs

Ratios, not absolute times, are the targets: both sides run on the same machine in the same process.
Nothing here is a test; tests never time anything.
"""
import argparse
import sys
import time


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds.

    Args:
        fn: the call to time; it must finish its work before it returns (synchronise a GPU inside it).
        repeats: timed calls; the median is robust to the odd slow call on a shared machine.
        warmup: untimed calls first (allocator, kernel and library set-up).
    """
    for _ in range(warmup):
        fn()
    # Each repeat timed alone with the highest-resolution clock; the median, not the mean, so that a repeat that
    # another process on the machine slowed down does not move the result.
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# POT's sinkhorn timed in a fresh process started outside the repository (where `import ot` is POT, not our ot.py):
# argv: the saved (B, K, N) log-probabilities and the number of repeats; prints {"dtype/iters": [median s, iterations
# kept]} as JSON. One POT call per image, uniform marginals, β = 0.05, at 3 and at 50 iterations.
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

# Peak extra memory of one ot.sinkhorn call, in a fresh process (so nothing else has raised the peak): argv: the
# repository root, B, K, N and the class marginal; prints the peak resident set size during the call minus the size
# before it, in units of the input's size in float32.
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
    exp-domain form of the reference code; the exp-domain and POT float64 ratios are printed for each marginal.

    Output, first table, one row per (K, iterations): our times with each marginal ("present" is the default
    recipe), the exp-domain form's, POT's in float32 (with the iterations it kept before its numerical errors) and in
    float64, then the ratios (reference time / ours: above 1 means ours is faster). Ours and the exp-domain form take
    turns within each repeat, so that load from other jobs on a shared machine falls on both alike; POT runs in its
    own process (its import name is ot too) right before. Second table: one iteration's cost in read passes over the
    input, and the peak extra memory of one call in copies of the input.

    Args:
        argv: --batch, --side, --classes, --repeats (see -h).
    """
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
    # One batch problem (scope="batch", as train.py runs it for DPT) of B images × N pixels per K.
    root = Path(__file__).resolve().parent
    B, N = args.batch, args.side**2
    print(f"B={B} N={N} torch threads={torch.get_num_threads()}; times are medians of {args.repeats} calls")
    print("| K | iters | ours uniform (ms) | ours present (ms) | exp-domain (ms) | POT f32 (ms) [its run] | POT f64 (ms) "
          "| exp-domain / uniform | exp-domain / present | POT f32 / uniform | POT f64 / uniform | POT f64 / present |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def in_turns(fns: dict, repeats: int) -> dict:
        """Median seconds of each call, the calls taking turns within each repeat (after one untimed round)."""
        times = {name: [] for name in fns}
        for repeat in range(repeats + 1):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if repeat:
                    times[name].append(time.perf_counter() - t0)
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    passes = {}
    for K in args.classes:
        # Segmentation-like teacher output: confident pixels, a few classes present.
        g = torch.Generator().manual_seed(K)
        logits = torch.randn(B, K, N, generator=g)
        label = torch.randint(min(K, 8), (B, N), generator=g)
        logits.scatter_add_(1, label[:, None], torch.full((B, 1, N), 8.0))
        log_p = logits.log_softmax(1)  # (B, K, N)
        # POT in its own process (see POT_TIMER): the same tensors, through a file.
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(log_p, Path(tmp) / "log_p.pt")
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            pot = json.loads(subprocess.run([sys.executable, "-c", POT_TIMER, "log_p.pt", str(args.repeats)], cwd=tmp,
                                            env=env, check=True, capture_output=True, text=True).stdout)
        # 3 iterations (the method) and 50 (the loop's own cost); both marginals of ours, the reference's form,
        # POT in float32 and float64.
        row_time = {}
        for iters in (3, 50):
            t = in_turns({"uniform": lambda: sinkhorn(log_p, iters=iters, scope="batch", class_marginal="uniform"),
                          "present": lambda: sinkhorn(log_p, iters=iters, scope="batch", class_marginal="present"),
                          "ref": lambda: reference_exp_domain(log_p, iters=iters)}, args.repeats)
            t_uni, t_pre, t_ref = t["uniform"], t["present"], t["ref"]
            (t_pot32, ran32), (t_pot64, _) = pot[f"float32/{iters}"], pot[f"float64/{iters}"]
            row_time[iters] = t_pre
            print(f"| {K} | {iters} | {t_uni * 1e3:.1f} | {t_pre * 1e3:.1f} | {t_ref * 1e3:.1f} | {t_pot32 * 1e3:.1f} "
                  f"[{ran32}] | {t_pot64 * 1e3:.1f} | {t_ref / t_uni:.2f}x | {t_ref / t_pre:.2f}x | {t_pot32 / t_uni:.2f}x "
                  f"| {t_pot64 / t_uni:.2f}x | {t_pot64 / t_pre:.2f}x |")
        # The cost of one iteration with the default recipe ("present"), (t(50) − t(3)) / 47, in units of one read
        # pass over the data (x.sum()).
        x = log_p.transpose(1, 2).contiguous()  # (B, N, K)
        t_pass = median_time(lambda: x.sum(), args.repeats)
        passes[K] = (row_time[50] - row_time[3]) / 47 / t_pass
    print()
    print("| K | one iteration, in read passes over (B, N, K) | peak extra memory, uniform / present (float32 copies of the input) |")
    print("| --- | --- | --- |")
    # Peak memory in a fresh process per marginal (see PEAK_MEMORY).
    for K in args.classes:
        peak = [float(subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(root), str(B), str(K), str(N), m],
                                     check=True, capture_output=True, text=True).stdout) for m in ("uniform", "present")]
        print(f"| {K} | {passes[K]:.2f} | {peak[0]:.2f} / {peak[1]:.2f} |")
    print("\nPeak memory: peak resident set size (VmHWM, reset through /proc/self/clear_refs) of a fresh process during")
    print("one call, minus its resident size before the call, in units of the input's size in float32; a call on a")
    print("64-pixel slice first, so that torch's one-time set-up is not counted.")


def bench_quality(argv: list[str]) -> None:
    """Images/s of quality.glcm_features vs scikit-image graycomatrix + graycoprops looped per image, and of
    quality.compression_ratio (JPEG) vs PNG, on real-photograph tiles at 1024x2048 (skimage.data.astronaut).

    Output: one row per metric and implementation with images/s and the ratio to its reference. The GLCM side runs
    with all torch threads and with one, to show what the thread pool adds. --device cuda times the torch side on a
    GPU (the references stay on the CPU).

    Args:
        argv: --height, --width, --batch, --repeats, --device (see -h).
    """
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
    # Inputs: real-photograph statistics at the paper's image size, the same grey images for both sides.
    photo = skdata.astronaut()  # (512, 512, 3) uint8
    reps = (math.ceil(args.height / photo.shape[0]), math.ceil(args.width / photo.shape[1]), 1)
    rgb = np.tile(photo, reps)[:args.height, :args.width]  # (H, W, 3)
    rgb = torch.from_numpy(rgb).permute(2, 0, 1)[None].repeat(args.batch, 1, 1, 1).contiguous()  # (B, 3, H, W)
    grey = quality.to_grey(rgb)  # (B, H, W), both sides start from the same grey images
    angles = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
    device = torch.device(args.device)
    grey_device, rgb_device = grey.to(device), rgb.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # Our GLCM at a given number of torch threads; the CPU pool of quality.glcm_features spreads
    # (image, offset) histograms over them. sync() makes GPU work finish inside the timed call.
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

    # The reference: scikit-image, one image at a time, the same four angles and all five statistics.
    def skimage_glcm() -> None:
        for image in grey.numpy():
            matrix = graycomatrix(image, [1], angles, levels=256, symmetric=True, normed=True)
            [graycoprops(matrix, name).mean() for name in quality.GLCM_STATS]

    # The compression-ratio reference: PNG (lossless) of one image.
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
    # Seconds per image: the median over repeats, divided by the batch.
    t_reference, t_torch, t_torch_1 = (sorted(times[name])[len(times[name]) // 2] / args.batch for name in runs)
    # The remaining rows: grey conversion (what RGB input adds) and JPEG vs PNG compression ratio.
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


def write_bench_datasets(root) -> None:
    """Three Cityscapes images (2048×1024 PNG, trainIds labels) under root/cs and three ADE20K images (683×512 JPEG)
    under root/ade, in the datasets' own layouts: toy scenes upsampled to those sizes, with noise so that the PNG and
    JPEG files have photo-like sizes and decoding costs."""
    import numpy as np
    from PIL import Image

    import data

    def scene(size, seed):
        image, label = data.render_toy_scene(np.random.default_rng(seed), data.TOY_SPLITS["train"])
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)).astype(np.float32)
        noise = np.random.default_rng(seed).normal(0, 3, image.shape)
        return np.clip(image + noise, 0, 255).astype(np.uint8), np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))

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


def bench_data(argv: list[str]) -> None:
    """Samples/s of data.py's labelled and synthetic pipelines vs a plain PIL + torchvision-v1 reference doing the
    same steps (rescale, pad, crop, flip, normalise; strong view: jitter, grayscale, blur), one thread as in a
    DataLoader worker, at Cityscapes (2048×1024 PNG, crop 798) and ADE20K (683×512 JPEG, crop 518) sizes.
    Both sides draw the same random parameters from the same torch seed, so their outputs are compared directly.

    Output, one row per dataset and pipeline: samples/s of ours and of the reference and their ratio, then the mean
    and standard deviation of the normalised pixels on both sides (equal: the same images) and the mean absolute
    difference in 8-bit gray levels (0 for labelled crops; about 1 for strong views: data.py's colour table against
    torchvision's ops one by one).

    Args:
        argv: --samples (see -h).
    """
    import random
    import tempfile
    from pathlib import Path

    import numpy as np
    import torch
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    import data

    parser = argparse.ArgumentParser(prog="bench.py data")
    parser.add_argument("--samples", type=int, default=16, help="samples per pipeline and side (default: 16)")
    args = parser.parse_args(argv)
    # Both pipelines run on one thread, the way each DataLoader worker runs them.
    torch.set_num_threads(1)
    random.seed(0)
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD

    def uniform(low, high):  # torch's global generator, in data.py's order, so both sides crop alike
        return low + (high - low) * torch.rand(()).item()

    # Rescale the whole image (not only the crop, as data.py does), then pad with 255, crop and flip:
    # the textbook order of the weak view's geometry.
    def reference_geometry(image, label, crop):
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

    # The labelled reference: decode, geometry, label ids through the dataset's table, normalise.
    def reference_labelled(image_path, label_path, crop, lut):
        image, label = reference_geometry(Image.open(image_path).convert("RGB"), Image.open(label_path), crop)
        target = torch.from_numpy(lut[np.array(label)].astype(np.int64))
        return TF.normalize(TF.to_tensor(image), mean, std), target

    # The synthetic reference: the same geometry, then the textbook strong view of data.py.
    def reference_synthetic(image_path, crop):
        image = Image.open(image_path).convert("RGB")
        image, padding = reference_geometry(image, Image.new("L", image.size, 0), crop)
        strong = data.strong_colour_reference(image)  # torchvision's jitter and grayscale, PIL's blur
        return (TF.normalize(TF.to_tensor(image), mean, std), TF.normalize(TF.to_tensor(strong), mean, std),
                torch.from_numpy(np.array(padding)) == 255, data.cutmix_box(crop))

    # Three images per dataset, written in each dataset's own layout and format (PNG / JPEG).
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_bench_datasets(root)
        # (dataset, root, synthetic folder, crop, label table): the paper's DPT crops.
        setups = [("cityscapes", root / "cs", root / "cs/leftImg8bit", 798, None),
                  ("ade20k", root / "ade", root / "ade/images", 518, data.REDUCE_ZERO_LUT)]
        # Header: samples/s of ours and of the reference, their ratio, and how alike their outputs are.
        print(f"data pipelines, samples/s on one thread ({args.samples} samples per side, same random draws)")
        print(f"{'dataset':<11}{'pipeline':<11}{'ours':>7}{'ref':>7}{'ratio':>7}   "
              f"{'mean ours/ref':>15}{'std ours/ref':>15}{'|diff| /255':>12}")
        for name, dataset_root, synthetic_root, crop, lut in setups:
            labelled = data.LabelledDataset(name, dataset_root, "train", crop_size=crop)
            synthetic = data.SyntheticDataset(synthetic_root, crop_size=crop)
            identity = np.arange(256, dtype=np.uint8)
            # Each pipeline: (ours, reference), called with the sample index.
            pipelines = {
                "labelled": (lambda i: labelled[i % 3],
                             lambda i: reference_labelled(*labelled.samples[i % 3], crop,
                                                          lut if lut is not None else identity)),
                "synthetic": (lambda i: synthetic[i % 3], lambda i: reference_synthetic(synthetic.images[i % 3], crop)),
            }
            # Both sides get the same torch seed per half and the same sample indices, so they draw the same crops.
            for pipeline, (ours, reference) in pipelines.items():
                timings, outputs = {"ours": 0.0, "ref": 0.0}, {"ours": [], "ref": []}
                for side, fn in (("ours", ours), ("ref", reference)) * 2:  # interleaved halves: fair under load
                    torch.manual_seed(len(outputs[side]))
                    start = time.perf_counter()
                    for i in range(len(outputs[side]), len(outputs[side]) + args.samples // 2):
                        outputs[side].append(fn(i))
                    timings[side] += time.perf_counter() - start
                # Statistics over the valid pixels of every view: equal means and stds say both sides made the same
                # images; the mean absolute difference says by how much they differ, in 8-bit gray levels.
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
                # samples/s per side, and the row of the table.
                rate = {side: args.samples / timings[side] for side in timings}
                print(f"{name:<11}{pipeline:<11}{rate['ours']:>7.1f}{rate['ref']:>7.1f}{rate['ours'] / rate['ref']:>6.2f}×"
                      f"   {stats[0][0]:>7.3f}/{stats[1][0]:<7.3f}{stats[0][1]:>7.3f}/{stats[1][1]:<7.3f}{difference:>10.2f}")


# What `python bench.py gpu` measures. Training setups: (arch, backbone, crop, B per stream), the paper's Cityscapes
# runs (DPT on DINOv2-S and -B at 798, Mask2Former with the L head on DINOv3-L at 768, 8 + 8 images, bf16); --tiny:
# the toy world's sizes, so that the same code runs on a CPU in seconds. Sinkhorn: B images of side² pixels each, the
# class counts of Cityscapes and ADE20K. GLCM: the size of a Cityscapes image.
GPU_SETUPS = {
    "full": [("dpt", "dinov2_s", 798, 8), ("dpt", "dinov2_b", 798, 8), ("mask2former", "dinov3_l", 768, 8)],
    "tiny": [("dpt", "toy", 64, 2), ("mask2former", "toy", 64, 2)],
}
GPU_OT = {"full": dict(batch=8, side=798, classes=(19, 150)), "tiny": dict(batch=2, side=48, classes=(19, 150))}
GPU_GLCM = {"full": (1024, 2048), "tiny": (64, 128)}


class PhaseTimer:
    """Wall time per named phase of a step; synchronises the device around each phase so that GPU work
    is charged to the phase that queued it.

        timer = PhaseTimer(device)
        with timer("ot"):
            ...                       # timer.total["ot"] grows by the wall time of this block
    """

    def __init__(self, device):
        import torch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.total = {}

    def __call__(self, name: str):
        """A context manager that adds the wall time of its block to total[name].

        The device is synchronised before the clock starts (so earlier queued work is not charged here) and before
        it stops (so this block's queued work is). On a CPU sync is a no-op.
        """
        import contextlib

        @contextlib.contextmanager
        def phase():
            self.sync()
            start = time.perf_counter()
            yield
            self.sync()
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start
        return phase()


def gpu_step_profile(arch: str, backbone: str, crop: int, batch: int, device, amp_dtype, steps: int) -> dict:
    """s/step, peak memory, and the shares of the teacher, OT and (Mask2Former) deformable attention in one
    SENSE training step of train.py (Cityscapes preset: K = 19, flip TTA, OHEM for DPT), random init, random images.

    Args:
        arch, backbone: as train.py's --arch and --backbone.
        crop: c, the square crop; batch: B real + B synthetic images per step.
        device, amp_dtype: where and in which autocast dtype (None: float32) the step runs.
        steps: timed steps after one warm-up step.
    Returns:
        dict: arch, backbone, crop, batch, s_per_step, peak_gib (NaN on a CPU), teacher_share, ot_share and, for
        Mask2Former, deform_share (each a fraction of the step's time).
    """
    from copy import deepcopy

    import torch

    import data
    import model as models
    import train

    # train.py's own presets for the Cityscapes run of this arch: crop, TTA, OHEM, lr, EMA, OT marginal.
    args = train.resolve_presets(train.parse_args(["--dataset", "cityscapes", "--arch", arch, "--backbone", backbone,
                                                   "--pretrained", "none", "--crop-size", str(crop),
                                                   "--batch-size", str(batch)]))
    K = args.num_classes = data.get_spec("cityscapes").num_classes
    torch.manual_seed(0)
    student = models.build_model(arch, backbone, K, "none").to(device).train()
    teacher = deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(train.param_groups(student, args.lr, args.head_lr_mult, args.weight_decay),
                                  lr=args.lr, weight_decay=args.weight_decay)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    # Random inputs of the run's shapes; labels in blocks of 32 px so that the set loss sees region-sized masks.
    # The CutMix box is always drawn (p = 1), the worst case of the step.
    image_x, image_w, image_s = (torch.randn(batch, 3, crop, crop, generator=g).to(device) for _ in range(3))
    blocks = torch.randint(K, (batch, 1, crop // 32 + 1, crop // 32 + 1), generator=g).float()
    label_x = torch.nn.functional.interpolate(blocks, size=(crop, crop), mode="nearest")[:, 0].long().to(device)
    valid = torch.ones(batch, crop, crop, dtype=torch.bool, device=device)
    box = torch.stack([data.cutmix_box(crop, p=1.0) for _ in range(batch)]).to(device)  # (B, c, c)
    timer = PhaseTimer(device)

    # One SENSE step built from train.py's stage functions, each phase timed: the teacher (stage 2, with TTA),
    # OT with the per-architecture labels (stage 4), and the rest (student forward and backward, AdamW, EMA).
    def step(i: int) -> None:
        with timer("teacher"), autocast():
            scores, query_conf = train.teacher_predict(teacher, image_w, args.tta)  # (B, K, c, c)
        mixed, scores = train.cutmix(image_s, box), train.cutmix(scores, box)
        with timer("ot"):  # stage 4 and the per-architecture labels
            targets, gate, _ = train.pseudo_targets(scores, valid, args, args.ot_marginal)
            label_u, gate = train.synthetic_labels(targets, gate, query_conf, args)
        with timer("student"):  # stages 5-9
            with autocast():
                pred_x, pred_u = train.split_outputs(student(torch.cat([image_x, mixed])), batch)
            loss_x = train.supervised_loss(pred_x, label_x, args, device)
            loss_u = train.synthetic_loss(pred_u, targets, label_u, gate, args, device)
            ((loss_x + loss_u) / 2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train.ema_update(teacher, student, i, args.ema_decay)

    # Deformable attention: record the calls of one step, then replay them alone (forward, and backward for the
    # student's calls) to charge its backward pass too, which hooks cannot see.
    calls = []
    attention = [m for m in (*student.modules(), *teacher.modules()) if type(m).__name__ == "MultiScaleDeformableAttention"]
    hooks = [m.register_forward_hook(lambda m, inputs, out: calls.append((m, inputs, torch.is_grad_enabled())))
             for m in attention]
    step(0)  # warm-up (allocator, kernels) and the calls to replay
    for hook in hooks:
        hook.remove()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    # Timed steps after the warm-up; peak memory counts from the reset above (allocated tensors, not the cache).
    timer.total = {}
    start = time.perf_counter()
    for i in range(1, steps + 1):  # step i's EMA uses λ of step i, as in a run
        step(i)
    timer.sync()
    # Wall time per step, and the phases' shares of it (the sum of the three is slightly below 1: the loop's own
    # bookkeeping and the synchronisations between phases are in no phase).
    per_step = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {"arch": arch, "backbone": backbone, "crop": crop, "batch": f"{batch} + {batch}", "s_per_step": per_step,
              "peak_gib": peak, "teacher_share": timer.total["teacher"] / steps / per_step,
              "ot_share": timer.total["ot"] / steps / per_step}
    if calls:
        # Each recorded call: the module, its inputs (query, reference points, value, level shapes) and whether
        # it ran with gradients (the student) or without (the teacher). Inputs are detached copies that ask for
        # gradients where the call did, so the backward pass through the attention alone is timed too; the
        # gradients it leaves on the student's parameters are cleared afterwards.
        def replay() -> None:
            for module, (query, reference, value, shapes), grad in calls:
                with torch.set_grad_enabled(grad), autocast():
                    q, v = query.detach().requires_grad_(grad), value.detach().requires_grad_(grad)
                    out = module(q, reference, v, shapes)
                if grad:
                    out.float().sum().backward()
            student.zero_grad(set_to_none=True)
        result["deform_share"] = median_time(lambda: (replay(), timer.sync()), repeats=3) / per_step
    return result


def gpu_sinkhorn_row(K: int, B: int, N: int, device, sync) -> dict:
    """ms per call of ot.sinkhorn (both marginals) and of the exp-domain form, 3 iterations, one batch problem of B
    images × N pixels of a segmentation-like teacher output (a few confident classes per image).

    Args:
        K: classes; B: images; N: pixels per image.
        device: where both run; sync: waits for the device (a no-op on a CPU).
    Returns:
        dict: K, batch, pixels, ours_uniform_ms, ours_present_ms, exp_domain_ms, autocast_max_diff (largest change
        of a plan entry under bf16 autocast: sinkhorn disables autocast inside, so 0 is expected).
    """
    import torch

    from ot import sinkhorn
    from tests.test_ot import reference_exp_domain

    # A teacher's output: random logits plus 8 on one of the first 8 classes per pixel (softmax maxima mostly above
    # 0.95), made on the CPU from a fixed seed so every device times the same numbers.
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(B, K, N, generator=g)
    label = torch.randint(min(K, 8), (B, N), generator=g)
    logits.scatter_add_(1, label[:, None], torch.full((B, 1, N), 8.0))
    log_p = logits.log_softmax(1).to(device)  # (B, K, N)
    row = {"K": K, "batch": B, "pixels": N}
    for marginal in ("uniform", "present"):
        row[f"ours_{marginal}_ms"] = 1e3 * median_time(
            lambda: (sinkhorn(log_p, iters=3, scope="batch", class_marginal=marginal), sync()), repeats=3)
    row["exp_domain_ms"] = 1e3 * median_time(lambda: (reference_exp_domain(log_p, iters=3), sync()), repeats=3)
    plain, _ = sinkhorn(log_p, iters=3, scope="batch")
    with torch.autocast(device.type, dtype=torch.bfloat16):  # as train.py's autocast on CUDA
        under, _ = sinkhorn(log_p, iters=3, scope="batch")
    row["autocast_max_diff"] = float((plain - under).abs().max())
    return row


def bench_gpu(argv: list[str]) -> None:
    """Every GPU figure in one run (docs/benchmarks.md): training-step time and memory of DPT and Mask2Former at the
    paper's sizes with the shares of teacher, OT and deformable attention; Sinkhorn against the exp-domain form at
    full resolution; whether the device keeps float32 denormals; GLCM throughput. One table, one JSON file.

        python bench.py gpu                         # CUDA, paper sizes, bf16 (5 timed steps per setup; not yet run on a GPU here)
        python bench.py gpu --device cpu --tiny     # the same code at toy sizes (12 s on the 2-core CPU)

    The training rows use train.py's own stage functions and presets with random init and random images (speed and
    memory do not depend on the weights); the shares are of the wall time of a step, measured with the device
    synchronised around each phase (which itself costs a little overlap). The deformable attention's share replays
    the recorded calls of one step alone, forward and, for the student's calls, backward.

    Args:
        argv: --device, --tiny, --steps, --json (see -h).
    """
    import json
    import math
    import os
    from pathlib import Path

    import torch

    import quality

    parser = argparse.ArgumentParser(prog="bench.py gpu")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (toy ViT, crop 64, 2 + 2 images) for a CPU check")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per setup (default: 5; --tiny 2)")
    parser.add_argument("--json", default="runs/bench_gpu.json", help="where to write the results (default: runs/bench_gpu.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py gpu: --device cuda but no CUDA device is visible (use --device cpu --tiny for the CPU check)")
    # The sizes of the run (--tiny: the toy world's), the timed steps, and autocast as train.py uses it: bf16 on
    # CUDA, float32 elsewhere.
    size = "tiny" if args.tiny else "full"
    steps = args.steps or (2 if args.tiny else 5)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    results = {"device": name, "torch": torch.__version__, "amp": str(amp_dtype), "steps": steps, "training": [],
               "sinkhorn": []}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # 1. Training steps of each setup (a fresh model each, memory released in between).
    for arch, backbone, crop, batch in GPU_SETUPS[size]:
        results["training"].append(gpu_step_profile(arch, backbone, crop, batch, device, amp_dtype, steps))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 2. Sinkhorn at full resolution against the exp-domain form (tests/test_ot.py's transcription).
    ot_size = GPU_OT[size]
    B, N = ot_size["batch"], ot_size["side"] ** 2
    for K in ot_size["classes"]:
        results["sinkhorn"].append(gpu_sinkhorn_row(K, B, N, device, sync))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. Denormals. exp(-100) = 3.7e-44 is a float32 denormal: kept, the exp-domain form survives on near-uniform pixels down
    # to p^20 ~ 1e-45 (K < 178); flushed to zero, every class below p = 0.0057 at a pixel is lost already.
    denormal = float(torch.exp(torch.tensor(-100.0, device=device))) != 0.0
    results["denormals_kept"] = denormal
    results["denormals_meaning"] = (
        "float32 denormals are kept: the exp-domain reference keeps near-uniform pixels up to K = 177 (p^20 >= 1.4e-45)"
        if denormal else "float32 denormals are flushed: the exp-domain reference loses every class below p = 0.0118 "
        "at a pixel (p^20 < 1.2e-38), and near-uniform pixels from K = 80 on")

    # 4. GLCM throughput on random grey images (quality.py's fidelity measure).
    height, width = GPU_GLCM[size]
    grey = torch.randint(0, 256, (4, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grey = grey.to(device)
    t = median_time(lambda: (quality.glcm_features(grey), sync()), repeats=3)
    results["glcm"] = {"size": f"{height}x{width}", "images_per_s": 4 / t}

    # The table: one row per measurement, in the order of the sections above.
    rows = []
    for r in results["training"]:
        setting = f"{r['arch']} {r['backbone']} crop {r['crop']}, {r['batch']}"
        rows.append((f"training step, {setting}", f"{r['s_per_step']:.3f} s/step"))
        rows.append((f"peak memory, {setting}", "n/a on cpu" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f} GiB"))
        rows.append((f"teacher / OT share of the step, {setting}", f"{r['teacher_share']:.1%} / {r['ot_share']:.1%}"))
        if "deform_share" in r:
            rows.append((f"deformable attention share of the step, {setting}", f"{r['deform_share']:.1%}"))
    for r in results["sinkhorn"]:
        setting = f"K = {r['K']}, B = {r['batch']}, {r['pixels']} pixels each, 3 iterations"
        for marginal in ("uniform", "present"):
            ours = r[f"ours_{marginal}_ms"]
            rows.append((f"sinkhorn {marginal} vs exp-domain form, {setting}",
                         f"{ours:.1f} ms vs {r['exp_domain_ms']:.1f} ms ({r['exp_domain_ms'] / ours:.2f}x)"))
        rows.append((f"sinkhorn plan under bf16 autocast vs without, {setting}",
                     f"max |diff| {r['autocast_max_diff']:.1e} (0 expected)"))
    rows.append(("float32 denormals (exp(-100) != 0)", results["denormals_meaning"]))
    rows.append((f"GLCM throughput, {results['glcm']['size']}", f"{results['glcm']['images_per_s']:.1f} images/s"))
    print(f"bench.py gpu: {name}, torch {torch.__version__}, autocast {amp_dtype}, {steps} timed steps per setup")
    print("| measurement | value |")
    print("| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value} |")
    # The JSON file, written atomically (a temporary file, then a rename).
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"written: {out}")

class StepPhases:
    """Exclusive wall time per named phase of train.py's loop, charged through wrappers around train.py's own
    functions; a phase inside another (the best.pt checkpoint inside an evaluation) is charged to itself only.

        phases = StepPhases()
        train.fetch = phases.wrap("data", train.fetch)   # every call adds its time to phases.total["data"]
    """

    def __init__(self):
        self.total, self.calls, self.stack = {}, {}, []
        self.counting = False  # off during the warm-up steps

    def wrap(self, name: str, fn):
        """fn, timed: its wall time minus that of the timed calls it makes goes to total[name]."""
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self.stack.append(0.0)  # time of the timed calls nested in this one
            try:
                return fn(*args, **kwargs)
            finally:
                inner = self.stack.pop()
                elapsed = time.perf_counter() - start
                if self.stack:
                    self.stack[-1] += elapsed
                if self.counting:
                    self.total[name] = self.total.get(name, 0.0) + elapsed - inner
                    self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def model_flops(net, images) -> dict:
    """FLOPs of one forward pass of net on images, per part: {module name: FLOPs}, with "total"
    (torch.utils.flop_counter: matmuls and convolutions, 2 FLOPs per multiply-add; element-wise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(images)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    counts["total"] = counts.pop("Global")
    return counts


def model_parts(counts: dict) -> dict:
    """model_flops' counts grouped into the model's parts, in the order they run: each ViT block alone, every other
    child of the backbone and of the head alone (a ModuleList such as the head's per-level projections as one part:
    its members' sum). Names lose the root's, e.g. "head.path_1", "backbone.blocks.0"."""
    named = {name.split(".", 1)[1]: count for name, count in counts.items() if "." in name}
    parts = {}
    for name in named:
        words = name.split(".")
        group = ".".join(words[:3] if words[:2] == ["backbone", "blocks"] else words[:2])
        if group in parts or len(words) < 2:  # the backbone and the head themselves are no part
            continue
        if group in named:  # a module that ran: its own count
            parts[group] = named[group]
        else:  # a container that never runs itself: the sum of its members
            depth = len(group.split(".")) + 1
            parts[group] = sum(count for key, count in named.items()
                               if key.startswith(group + ".") and len(key.split(".")) == depth)
    return parts


def step_flops(net, batch_x: int, batch_u: int, crop: int, teacher_views: int) -> dict:
    """FLOPs of one SENSE step: the student's forward and backward on [x; u_s], the teacher's forward on its views."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(batch_x + batch_u, 3, crop, crop)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(images)
        (out if torch.is_tensor(out) else out["pred_masks"]).float().mean().backward()  # the backward's FLOPs
    net.zero_grad(set_to_none=True)
    student = counter.get_total_flops()
    teacher = model_flops(net, torch.randn(1, 3, crop, crop))["total"] * teacher_views
    return {"student": student, "teacher": teacher}


def bench_train(argv: list[str]) -> None:
    """The toy default training step (train.py, as `python train.py` runs it), split into its parts: data (waiting
    for the loaders), the teacher (TTA), OT (targets, gate and labels), the student's forward and backward (with
    CutMix and the losses), the optimizer and the EMA, and the machinery (per-step statistics and the log line every
    step; pictures, evaluation and checkpoints once per evaluation interval, amortised over its steps). Then the
    FLOPs of each part of the model and the FLOP/s the step achieves, against a dense matmul in the same process.

        python bench.py train                          # the toy default (DPT, sense), 60 timed steps
        python bench.py train --steps 30 --method supervised   # any train.py flag after the bench's own

    The step is train.py's own: train.main runs with --iters warm-up + steps in a temporary run folder, its
    functions wrapped by timers (StepPhases); nothing of the method changes.

    Args:
        argv: --steps, --warmup, then any train.py flags (see -h).
    """
    import contextlib
    import io
    import tempfile

    import torch

    import train

    parser = argparse.ArgumentParser(prog="bench.py train")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default: 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    args, train_flags = parser.parse_known_args(argv)
    phases, seen = StepPhases(), {}
    original = {name: getattr(train, name) for name in ("fetch", "teacher_predict", "pseudo_targets",
                                                        "synthetic_labels", "sense_step", "ema_update", "record",
                                                        "draw_panel", "evaluate_teacher", "checkpoint", "finish",
                                                        "prepare")}
    charge = {"fetch": "data", "teacher_predict": "teacher", "pseudo_targets": "ot", "synthetic_labels": "ot",
              "sense_step": "student", "ema_update": "optimizer + EMA", "record": "statistics + log",
              "draw_panel": "panel", "evaluate_teacher": "evaluation", "checkpoint": "checkpoint",
              "finish": "final table"}
    steps_done = [0]

    def sense_step(run):  # counts steps: the timers run from the first step after the warm-up
        phases.counting = steps_done[0] >= args.warmup
        if steps_done[0] == args.warmup:
            seen["start"] = time.perf_counter()
        steps_done[0] += 1
        return timed_step(run)

    def prepare(flags):  # the run, once made: its optimizer's step is timed too
        run = original["prepare"](flags)
        run.optimizer.step = phases.wrap("optimizer + EMA", run.optimizer.step)
        seen["run"] = run
        return run

    timed_step = phases.wrap("student", original["sense_step"])
    for name, part in charge.items():
        if name != "sense_step":
            setattr(train, name, phases.wrap(part, original[name]))
    train.sense_step, train.prepare = sense_step, prepare
    total_steps = args.warmup + args.steps
    try:
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # the run's log lines and progress bar
            train.main(["--iters", str(total_steps), "--out", out, *train_flags])
            wall = time.perf_counter() - seen["start"]
    finally:
        for name, fn in original.items():
            setattr(train, name, fn)
    run = seen["run"]
    # The pictures, the evaluation and the checkpoints ran once, at the bench run's end, and so did the final table;
    # a run with these flags and its own --iters has them once every --panel-every / --eval-every / --save-every
    # steps, and once per run: their time per step is their time over that interval. The wall time of the timed
    # steps includes each once: the loop's own remainder is what no phase holds.
    default = train.resolve_presets(train.parse_args(train_flags))
    every = default.eval_every or run.args.eval_every  # real datasets: one epoch, resolved in train.prepare
    interval = {"panel": every if default.panel_every is None else default.panel_every,
                "evaluation": every, "checkpoint": default.save_every or every, "final table": default.iters}
    once = sum(phases.total.get(name, 0.0) for name in interval)
    per_step = {name: phases.total.get(name, 0.0) / args.steps for name in
                ("data", "teacher", "ot", "student", "optimizer + EMA", "statistics + log")}
    per_step["loop remainder"] = (wall - once - sum(phases.total.get(name, 0.0) for name in set(charge.values())
                                                    if name not in interval)) / args.steps
    for name, every in interval.items():
        per_step[f"{name} (1 per {every or 'never'} steps)"] = phases.total.get(name, 0.0) / every if every else 0.0
    step_time = sum(per_step.values())
    # FLOPs: one forward per part of the model on one crop, and one step's student and teacher.
    crop, B = run.args.crop_size, run.args.batch_size
    B_x = run.args.real_batch or B
    net = run.student
    parts = model_flops(net, torch.randn(1, 3, crop, crop))
    synthetic = run.use_synthetic
    views = (B + B // 2 if run.args.tta != "none" else B) if synthetic else 0  # TTA's flip on half the batch
    flops = step_flops(net, B_x, B if synthetic else 0, crop, views)
    # The machine's practical limit: a dense 1024 x 1024 float32 matmul with the same threads.
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = 2 * 1024**3 / median_time(lambda: a @ b, repeats=20, warmup=3)
    model_time = per_step["teacher"] + per_step["student"]
    print(f"bench.py train: {run.args.method} | {run.args.arch}/{run.args.backbone} | crop {crop} | {B_x} real"
          f"{f' + {B} synthetic' if synthetic else ''} | torch threads {torch.get_num_threads()} | "
          f"{args.steps} timed steps after {args.warmup}")
    print("| part | ms per step | share |")
    print("| --- | ---: | ---: |")
    for name, seconds in per_step.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / step_time:.1%} |")
    print(f"| **step** | **{step_time * 1e3:.1f}** | 100% |")
    print()
    print(f"| model part (one {crop}x{crop} crop, forward) | MFLOP | share |")
    print("| --- | ---: | ---: |")
    for name, count in model_parts(parts).items():
        print(f"| {name} | {count / 1e6:.1f} | {count / parts['total']:.1%} |")
    print(f"| **forward, one crop** | **{parts['total'] / 1e6:.1f}** | 100% |")
    print()
    step_total = flops["student"] + flops["teacher"]
    print(f"FLOPs per step: student forward + backward on {B_x + (B if synthetic else 0)} crops "
          f"{flops['student'] / 1e9:.2f} G, teacher forward on {views} crops {flops['teacher'] / 1e9:.2f} G; "
          f"achieved in the teacher + student time: {step_total / model_time / 1e9:.1f} GFLOP/s; dense 1024^2 "
          f"float32 matmul in this process: {matmul / 1e9:.1f} GFLOP/s ({step_total / model_time / matmul:.0%} of it)")


# `python bench.py <name>` runs BENCHES[name] with the rest of the command line; each prints its own table.
BENCHES = {}
BENCHES["ot"] = bench_ot
BENCHES["quality"] = bench_quality
BENCHES["data"] = bench_data
BENCHES["gpu"] = bench_gpu
BENCHES["train"] = bench_train


def main() -> None:
    """`python bench.py <which> [its flags]`: the first word picks the benchmark, the rest are its own flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args()
    BENCHES[args.which](rest)


if __name__ == "__main__":
    sys.exit(main())
