"""Synthetic images for SENSE: prompts, then Flux through diffusers (docs/generate.md). Paper: the dual-factor
analysis (dense vs sparse composition, here prompts from label statistics) and the 2x synthetic sets of the
main results (one Flux and one Flux-WLF image per real image, prompted with its caption).

    # prompts from the reference captions (one per real image; either file_name variant)
    python generate.py prompts --captions cityscapes_gemini.jsonl --out prompts/cityscapes.jsonl
    # prompts from label statistics of a real dataset: the composition factor, reproducible by seed
    python generate.py prompts --dataset cityscapes --data-root data/cityscapes --kind dense --seed 0 \
        --out prompts/cityscapes_dense.jsonl
    # CPU, toy world (seconds; the images need a Flux-architecture pipeline folder)
    python generate.py prompts --dataset toy --kind sparse --num 8 --out runs/toy_sparse.jsonl
    # images: one GPU, or many with torchrun (each rank takes its own slice) or --shard i/n
    python generate.py images --model black-forest-labs/FLUX.1-dev --prompts prompts/cityscapes.jsonl \
        --dataset cityscapes --generator flux --seeds 0 --out data/synthetic/cityscapes
    torchrun --nproc_per_node 8 generate.py images ...same flags...
    python generate.py merge --out data/synthetic/cityscapes   # manifest + split from the images on disk

Output of `images` (the folder given by --out):
    <generator>_seed<k>/<source stem>.png   every image of the folder starts from seed k; PNGs (lossless, so
                                            the fidelity metrics of quality.py see what Flux made); each PNG
                                            carries its manifest record in a text chunk
    manifest.jsonl   one JSON object per image: prompt, seed, model, height, width, steps, guidance,
                     source, file (relative to this folder), sorted by file
    synthetic.txt    split file for train.py: one image path per line, relative to this folder
The manifest and the split are rebuilt from the images on disk, so an image and its record appear
together (one os.replace) and shards or resumed runs give the same files as one uninterrupted run.
"""
import argparse
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from model import pick_device

# Text-encoder limits, special tokens included: CLIP ViT-L/14's context (Flux uses only its pooled vector)
# and FluxPipeline's default max_sequence_length for T5-XXL.
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512
# Special tokens a sequence carries: CLIP adds <|startoftext|> and <|endoftext|>, T5 adds </s>.
CLIP_SPECIAL_TOKENS = 2
T5_SPECIAL_TOKENS = 1
# Approximate count without the tokenizers: every word and every punctuation mark is at least one
# BPE / SentencePiece token, so this is a lower bound ("at least N prompts exceed").
APPROX_TOKEN = re.compile(r"\w+|[^\w\s]")

# (height, width) per dataset. Cityscapes: the real images' size. ADE20K and COCO have no fixed size
# (about 512x683 and 480x640); 1024x1024 is Flux's native one-megapixel resolution. Toy: the toy world's
# size class. Our choice: the paper does not state its generation sizes.
SIZE_PRESETS = {"toy": (128, 128), "cityscapes": (1024, 2048), "ade20k": (1024, 1024), "coco": (1024, 1024)}
# Flux works on 2x2 patches of an 8x-downsampled latent: sides must be multiples of 16.
SIZE_MULTIPLE = 16

# Classes per label-statistics prompt: "sparse" = one or two (the paper's sparse split); "dense" = several
# co-occurring classes. Our choice of the dense range: Cityscapes images hold 10-15 classes each.
CLASSES_PER_PROMPT = {"sparse": (1, 2), "dense": (5, 8)}
# A class counts as present in a real image when it covers at least this fraction of the labelled pixels
# (drops speckles of label noise from the co-occurrence counts).
MIN_CLASS_FRACTION = 0.002
# Where a class's centroid lies in a 3x3 grid over the image -> the spatial words of the prompt.
SPATIAL_WORDS = (("in the upper left", "at the top", "in the upper right"),
                 ("on the left", "in the center", "on the right"),
                 ("in the lower left", "at the bottom", "in the lower right"))
SCENES = {"toy": "a toy world of simple coloured shapes",
          "cityscapes": "a street scene in a German city, seen from the driver's seat of a car",
          "ade20k": "an indoor or outdoor scene",
          "coco": "an everyday scene"}
DENSITY_WORDS = {"dense": "a busy, cluttered scene with many objects",
                 "sparse": "a simple, uncluttered scene with few objects"}
# Classes that are not things one can ask a generator for.
UNNAMEABLE_CLASSES = {"background"}

MANIFEST = "manifest.jsonl"
PNG_RECORD_KEY = "sense"  # PNG text chunk holding an image's manifest record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every knob of the three commands: prompts, images, merge."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prompts", help="write a prompt list (JSONL) from captions or label statistics")
    # source
    p.add_argument("--captions", type=Path, help="reference caption JSONL ({file_name, text} per line) to import")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), help="build prompts from this dataset's train labels")
    p.add_argument("--data-root", type=Path, help="dataset root (default: data/<dataset>)")
    p.add_argument("--kind", choices=sorted(CLASSES_PER_PROMPT), default="dense",
                   help="composition: dense = 5-8 co-occurring classes, sparse = 1-2 (default: dense)")
    p.add_argument("--num", type=int, help="prompts to build (default: one per labelled training image)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the label-statistics prompts (default: 0)")
    p.add_argument("--scene", help="scene words of the prompts (default: per dataset, see SCENES)")
    # token counting
    p.add_argument("--tokenizers", help="Flux pipeline folder or hub id whose tokenizer/ and tokenizer_2/ count "
                                        "tokens (default: a word-and-punctuation lower bound)")
    p.add_argument("--out", type=Path, required=True, help="output prompt list (.jsonl)")

    g = sub.add_parser("images", help="generate images with a Flux pipeline (sharded, resumable)")
    # model
    g.add_argument("--model", required=True, help="FluxPipeline folder (save_pretrained layout) or hub id")
    g.add_argument("--generator", default="flux",
                   help="generator name in the output folder <generator>_seed<k> (default: flux)")
    # prompts and size
    g.add_argument("--prompts", type=Path, required=True,
                   help="prompt list from `generate.py prompts`, or a reference caption JSONL")
    g.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one image per prompt and seed k, in <generator>_seed<k>/ (default: 0)")
    g.add_argument("--dataset", choices=sorted(SIZE_PRESETS), help="size preset (see SIZE_PRESETS)")
    g.add_argument("--height", type=int, help="image height, a multiple of 16 (default: dataset preset)")
    g.add_argument("--width", type=int, help="image width, a multiple of 16 (default: dataset preset)")
    # sampling
    g.add_argument("--steps", type=int, default=28, help="denoising steps (default: 28, FluxPipeline's default)")
    g.add_argument("--guidance", type=float, default=3.5,
                   help="distilled guidance scale (default: 3.5, FluxPipeline's default; schnell ignores it)")
    g.add_argument("--max-sequence-length", type=int, default=T5_MAX_TOKENS,
                   help="T5 tokens seen by Flux (default: 512; FLUX.1-schnell takes at most 256)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="prompts per pipeline call; noise is per image either way (default: 1)")
    # system
    g.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cuda, cuda:1, cpu, ... (default: auto)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights dtype (default: auto = bfloat16 on cuda, float32 elsewhere)")
    g.add_argument("--offload", nargs="?", const="model", choices=["none", "model", "sequential"], default="none",
                   help="CPU offload for small cards (needs accelerate): model = one component on the GPU at a "
                        "time, sequential = layer by layer, slowest (default: none; --offload alone = model)")
    g.add_argument("--vae-tiling", action="store_true", help="decode the VAE in tiles (less memory at 1024x2048)")
    g.add_argument("--shard",
                   help="i/n: generate slice i (0-based) of n (default: torchrun's RANK/WORLD_SIZE, else 0/1)")
    # output
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--split", default="synthetic.txt", help="split file name inside --out (default: synthetic.txt)")

    m = sub.add_parser("merge", help="rewrite manifest.jsonl and the split file from the images on disk")
    m.add_argument("--out", type=Path, required=True, help="output folder of `images`")
    m.add_argument("--split", default="synthetic.txt", help="split file name inside --out (default: synthetic.txt)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- prompt lists

def load_prompts(path: Path) -> list[dict]:
    """Read a prompt list: ours ({source, text, ...}) or a reference caption file ({file_name, text}).

    Both reference variants of `file_name` ("data/cityscapes/leftImg8bit/..." and "leftImg8bit/...") are
    kept as given; only their basename names the synthetic image.

    Args:
        path: JSONL file, one object per line.
    Returns:
        One dict per line with at least `source` (str) and `text` (str), in file order.
    """
    if not path.is_file():
        raise SystemExit(f"{path}: prompt file not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"{path}:{line_no}: expected one JSON object per line") from None
            source = record.get("source", record.get("file_name")) if isinstance(record, dict) else None
            if not isinstance(source, str) or not isinstance(record.get("text"), str):
                raise SystemExit(f"{path}:{line_no}: expected keys 'file_name' (or 'source') and 'text' with strings")
            # `file_name` (reference captions) becomes `source`; any other key of the line is kept as it is
            prompts.append({**{k: v for k, v in record.items() if k != "file_name"}, "source": source})
    if not prompts:
        raise SystemExit(f"{path}: no prompts in the file")
    return prompts


def output_name(source: str) -> str:
    """File name of the synthetic image of a source image: its stem, always .png (lossless)."""
    return Path(source).stem + ".png"


def check_unique_names(prompts: list[dict], path: Path) -> None:
    """Two prompts naming the same output file would overwrite each other: refuse."""
    seen = {}
    for i, prompt in enumerate(prompts):
        name = output_name(prompt["source"])
        if name in seen:
            raise SystemExit(f"{path}: prompts {seen[name] + 1} and {i + 1} both name the output {name} "
                             "(sources must have distinct basenames)")
        seen[name] = i


def load_tokenizers(model: str) -> tuple:
    """The CLIP and T5 tokenizers of a Flux pipeline folder or hub id."""
    from transformers import AutoTokenizer
    try:
        return (AutoTokenizer.from_pretrained(model, subfolder="tokenizer"),
                AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--tokenizers {model}: no tokenizer/ and tokenizer_2/ loadable ({str(err).splitlines()[0]})")


def token_ends(text: str, tokenizer=None) -> list[int]:
    """Character offset where each (non-special) token of text ends; the regex lower bound without a tokenizer."""
    if tokenizer is None:
        return [match.end() for match in APPROX_TOKEN.finditer(text)]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [end for _, end in offsets]


def special_tokens(tokenizer, default: int) -> int:
    """Special tokens the tokenizer adds to one sequence (default without a tokenizer)."""
    return default if tokenizer is None else tokenizer.num_special_tokens_to_add()


def count_and_truncate(prompts: list[dict], tokenizers: tuple | None) -> tuple[int, int]:
    """Count CLIP and T5 tokens of each prompt (in place) and cut texts longer than T5's limit.

    CLIP's limit is only counted: Flux takes its pooled vector from the first 77 tokens and the whole
    text still reaches T5. Beyond T5's 512 nothing reaches the generator, so the text is cut there and
    marked `truncated` with its original count kept in `t5_tokens`.

    Args:
        prompts: dicts with `text`; gain `clip_tokens`, `t5_tokens` (int, special tokens included) and
            `truncated` (bool).
        tokenizers: (CLIP, T5) tokenizers, or None for the regex lower bound.
    Returns:
        (prompts over CLIP's limit, prompts over T5's limit).
    """
    clip_tok, t5_tok = tokenizers if tokenizers is not None else (None, None)
    clip_special = special_tokens(clip_tok, CLIP_SPECIAL_TOKENS)
    t5_special = special_tokens(t5_tok, T5_SPECIAL_TOKENS)
    over_clip = over_t5 = 0
    for prompt in prompts:
        t5_ends = token_ends(prompt["text"], t5_tok)
        prompt["clip_tokens"] = len(token_ends(prompt["text"], clip_tok)) + clip_special
        prompt["t5_tokens"] = len(t5_ends) + t5_special
        prompt["truncated"] = prompt["t5_tokens"] > T5_MAX_TOKENS
        over_clip += prompt["clip_tokens"] > CLIP_MAX_TOKENS
        if prompt["truncated"]:
            over_t5 += 1
            prompt["text"] = prompt["text"][:t5_ends[T5_MAX_TOKENS - t5_special - 1]]
    return over_clip, over_t5


# ------------------------------------------------------------------------------ label-statistics prompts

def label_statistics(dataset: str, root: Path) -> dict:
    """Class frequency, co-occurrence and centroid positions over a dataset's labelled training images.

    Args:
        dataset: name in data.DATASETS.
        root: dataset root (the toy world is generated there if absent).
    Returns:
        dict with `num_images` (int), `frequency` (K,) images holding each class, `cooccurrence` (K, K)
        images holding both classes, `position` (K, 3, 3) how often a class's centroid falls in each cell
        of a 3x3 grid over the image.
    """
    try:
        data.prepare_root(dataset, root)
        samples = [(image, label) for image, label in data.read_split(data.split_path(dataset, root, "train"))
                   if label is not None]
    except data.DataError as err:
        raise SystemExit(str(err)) from None
    if not samples:
        raise SystemExit(f"{data.split_path(dataset, root, 'train')}: no labelled lines ('image label') to count")
    num_classes = data.DATASETS[dataset].num_classes
    frequency = np.zeros(num_classes, np.int64)
    cooccurrence = np.zeros((num_classes, num_classes), np.int64)
    position = np.zeros((num_classes, 3, 3), np.int64)
    for _, label_path in tqdm(samples, desc="label statistics", leave=False, disable=None):
        try:
            label = data.load_label(dataset, label_path)  # (H, W) uint8, 255 = ignore
        except data.DataError as err:
            raise SystemExit(str(err)) from None
        height, width = label.shape
        rows, cols = np.indices(label.shape)  # (H, W) each
        flat = label.ravel().astype(np.int64)
        # one bincount each for pixel counts and row / column sums: class k's centroid is (row_sum, col_sum) / pixels
        pixels = np.bincount(flat, minlength=256)[:num_classes]  # (K,) pixels per class; 255 dropped
        row_sum = np.bincount(flat, weights=rows.ravel(), minlength=256)[:num_classes]  # (K,)
        col_sum = np.bincount(flat, weights=cols.ravel(), minlength=256)[:num_classes]  # (K,)
        present = pixels >= max(MIN_CLASS_FRACTION * pixels.sum(), 1)  # (K,) bool
        idx = np.flatnonzero(present)
        # image counts, not pixel counts: a class present in an image counts once, however much of it it covers
        frequency[idx] += 1
        cooccurrence[np.ix_(idx, idx)] += 1
        # centroid -> its cell of the 3x3 grid, 0..2 per axis (the minimum guards the last row and column)
        cell_row = np.minimum((3 * row_sum[idx] / pixels[idx] / height).astype(int), 2)
        cell_col = np.minimum((3 * col_sum[idx] / pixels[idx] / width).astype(int), 2)
        position[idx, cell_row, cell_col] += 1
    return {"num_images": len(samples), "frequency": frequency, "cooccurrence": cooccurrence, "position": position}


def class_phrase(name: str) -> str:
    """Class name as prompt words: the first synonym ("windowpane, window" -> "windowpane")."""
    return name.split(",")[0].split(";")[0].strip()


def build_prompts(stats: dict, classes: tuple[str, ...], *, kind: str, num: int, seed: int, scene: str) -> list[dict]:
    """Sample prompts from label statistics: classes drawn by co-occurrence, each with a spatial word.

    The first class is drawn by image frequency; each further class l with probability proportional to
    prod_k P(l | k) over the classes k drawn so far (so every pair co-occurs in some real image); drawing
    stops at the target count or when no class co-occurs with all drawn ones. The spatial word of a class
    is drawn from where its centroid lies in the real images.

    Args:
        stats: output of label_statistics.
        classes: class names, K of them.
        kind: "dense" or "sparse" (CLASSES_PER_PROMPT).
        num: prompts to build.
        seed: numpy seed; the same stats and seed give the same prompts.
        scene: scene words.
    Returns:
        Dicts {source: "<kind>_<i>.png", text, classes: [names]}.
    """
    rng = np.random.default_rng(seed)
    frequency = stats["frequency"].astype(np.float64)  # (K,)
    nameable = np.array([name not in UNNAMEABLE_CLASSES for name in classes])  # (K,) bool
    frequency = np.where(nameable, frequency, 0.0)
    if frequency.sum() == 0:
        raise SystemExit("label statistics: no nameable class occurs in the training labels")
    # P(l | k): row k = images holding k and l / images holding k (0 where k never occurs).
    conditional = stats["cooccurrence"] / np.maximum(stats["frequency"], 1)[:, None]  # (K, K)
    lo, hi = CLASSES_PER_PROMPT[kind]
    prompts = []
    for i in range(num):
        target = int(rng.integers(lo, hi + 1))
        # the first class by image frequency, so frequent classes lead as often as they do in the real images
        chosen = [int(rng.choice(len(classes), p=frequency / frequency.sum()))]
        weights = frequency > 0  # (K,) candidates
        while len(chosen) < target:
            weights = weights * conditional[chosen[-1]] * nameable  # (K,)
            weights[chosen] = 0.0
            if weights.sum() <= 0:
                break
            chosen.append(int(rng.choice(len(classes), p=weights / weights.sum())))
        # each class's spatial word follows where it lies in the real images (road at the bottom, sky at the top)
        parts = []
        for k in chosen:
            cells = stats["position"][k].ravel().astype(np.float64)  # (9,)
            cell = int(rng.choice(9, p=cells / cells.sum()))
            parts.append(f"{class_phrase(classes[k])} {SPATIAL_WORDS[cell // 3][cell % 3]}")
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        # one template for both kinds: the density words and the number of classes set dense and sparse apart
        text = f"A realistic photo of {scene}, {DENSITY_WORDS[kind]}: {listing}."
        prompts.append({"source": f"{kind}_{i:06d}.png", "text": text, "classes": [classes[k] for k in chosen]})
    return prompts


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Write JSON lines through a temporary file and os.replace: readers never see half a file."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file in the same folder, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cmd_prompts(args: argparse.Namespace) -> None:
    """`prompts`: import captions or build label-statistics prompts, count tokens, write the JSONL."""
    if (args.captions is None) == (args.dataset is None):
        raise SystemExit("prompts: give exactly one of --captions FILE or --dataset NAME")
    # captions: one prompt per real image, only source and text kept (the prompts of the main results' 2x sets)
    if args.captions is not None:
        prompts = [{"source": p["source"], "text": p["text"]} for p in load_prompts(args.captions)]
        check_unique_names(prompts, args.captions)
        origin = str(args.captions)
    # label statistics: the composition factor, one prompt per labelled image unless --num says otherwise
    else:
        root = args.data_root or Path("data") / args.dataset
        stats = label_statistics(args.dataset, root)
        num = args.num if args.num is not None else stats["num_images"]
        if num < 1:
            raise SystemExit(f"--num {num}: expected at least 1")
        scene = args.scene or SCENES.get(args.dataset, "a scene")
        prompts = build_prompts(stats, data.DATASETS[args.dataset].classes, kind=args.kind, num=num,
                                seed=args.seed, scene=scene)
        origin = f"{args.kind} prompts from {stats['num_images']} {args.dataset} labels, seed {args.seed}"
    # both sources go through the same token count and T5 cut before anything is written
    tokenizers = load_tokenizers(args.tokenizers) if args.tokenizers else None
    over_clip, over_t5 = count_and_truncate(prompts, tokenizers)
    write_jsonl_atomic(args.out, prompts)
    bound = "" if tokenizers else "at least "  # the regex count is a lower bound
    print(f"prompts: {len(prompts)} ({origin}) -> {args.out}")
    print(f"tokens: {bound}{over_clip} of {len(prompts)} exceed CLIP's {CLIP_MAX_TOKENS} (Flux pools the first "
          f"{CLIP_MAX_TOKENS}; the full text still reaches T5), {bound}{over_t5} exceed T5's {T5_MAX_TOKENS} "
          f"(cut to {T5_MAX_TOKENS}, marked \"truncated\": true)"
          + ("" if tokenizers else "; counted as words + punctuation, pass --tokenizers MODEL for exact counts"))


# ----------------------------------------------------------------------------------------------- images

def resolve_shard(spec: str | None) -> tuple[int, int]:
    """(i, n) from --shard i/n, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if spec is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    match = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not match or not int(match[1]) < int(match[2]):
        raise SystemExit(f"--shard {spec}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(match[1]), int(match[2])


def load_pipeline(model: str, *, dtype: torch.dtype, device: torch.device, offload: str, vae_tiling: bool):
    """FluxPipeline from a local folder or hub id, placed on device (or offloaded to the CPU)."""
    try:
        import diffusers
        from diffusers import FluxPipeline
    except ImportError:
        raise SystemExit("generate.py images needs diffusers: pip install diffusers transformers") from None
    # a path-like name (./, /, ~, or two slashes) not on disk is a mistyped folder: say so before the hub is tried
    if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise SystemExit(f"--model {model}: folder not found (a hub id looks like black-forest-labs/FLUX.1-dev)")
    if offload != "none":
        import importlib.util
        if importlib.util.find_spec("accelerate") is None:
            raise SystemExit(f"--offload {offload} needs accelerate: pip install accelerate")
        if device.type == "cpu":
            raise SystemExit(f"--offload {offload}: offloading needs a GPU (--device is {device})")
    # diffusers 0.42 renamed torch_dtype to dtype; older versions know only torch_dtype.
    new_keyword = tuple(int(part) for part in diffusers.__version__.split(".")[:2]) >= (0, 42)
    try:
        pipe = FluxPipeline.from_pretrained(model, **{"dtype" if new_keyword else "torch_dtype": dtype})
    except (OSError, ValueError) as err:
        where = "local folder" if Path(model).exists() else "hub id (no local folder of that name)"
        raise SystemExit(f"--model {model}: cannot load a FluxPipeline from this {where}: "
                         f"{str(err).splitlines()[0]}") from None
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)  # one bar over images, not one per denoising loop
    return pipe


def read_record(path: Path) -> dict | None:
    """The manifest record stored in a PNG's text chunk (None for images we did not write)."""
    from PIL import Image
    with Image.open(path) as image:  # header and text chunks only: pixels are not decoded
        text = image.info.get(PNG_RECORD_KEY)
    return json.loads(text) if text else None


def save_png_atomic(image, path: Path, record: dict) -> None:
    """Save a PIL image with its record through a temporary file + os.replace: never a truncated PNG."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(PNG_RECORD_KEY, json.dumps(record, ensure_ascii=False))
    # The temporary name is hidden and does not end in an image suffix, so folder readers skip it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out: Path, split: str) -> int:
    """Rebuild manifest.jsonl and the split file from every image under out/*_seed*/ that carries a record.

    Sorted by file path, so any order of shards or resumes gives identical files.

    Returns:
        Number of images listed.
    """
    records = []
    for folder in sorted(p for p in out.glob("*_seed*") if p.is_dir()):
        for path in sorted(folder.glob("*.png")):
            # only images that carry a record are listed: a PNG copied in by hand is left out
            record = read_record(path)
            if record is not None:
                records.append({**record, "file": path.relative_to(out).as_posix()})
    write_jsonl_atomic(out / MANIFEST, records)
    write_text_atomic(out / split, "".join(r["file"] + "\n" for r in records))
    return len(records)


def cmd_images(args: argparse.Namespace) -> None:
    """`images`: this shard's unfinished images, then the manifest and split once the whole work list is done."""
    # 1. configuration: size, shard, device, dtype
    preset = SIZE_PRESETS.get(args.dataset, (None, None))
    height = args.height or preset[0]
    width = args.width or preset[1]
    if height is None or width is None:
        raise SystemExit("images: give --dataset (size preset) or both --height and --width")
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise SystemExit(f"{flag} {value}: expected a positive multiple of {SIZE_MULTIPLE}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct seeds")
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size: expected at least 1")
    if not re.fullmatch(r"[\w.+-]+", args.generator):
        raise SystemExit(f"--generator {args.generator}: expected a folder-name word (letters, digits, . _ + -)")
    shard, num_shards = resolve_shard(args.shard)
    device = pick_device(args.device)
    # auto: bfloat16 on CUDA, the dtype Flux's weights are published in; float32 on CPU and MPS
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]

    # 2. work list: prompt x seed, the same on every rank; this rank takes every num_shards-th item
    prompts = load_prompts(args.prompts)
    check_unique_names(prompts, args.prompts)
    work = [(seed, prompt) for seed in args.seeds for prompt in prompts]
    mine = work[shard::num_shards]

    def target(seed: int, prompt: dict) -> Path:
        """Final path of one (seed, prompt) image: <out>/<generator>_seed<k>/<source stem>.png."""
        return args.out / f"{args.generator}_seed{seed}" / output_name(prompt["source"])

    def record(seed: int, prompt: dict) -> dict:
        """The manifest record of one image, also stored in its PNG and compared on resume."""
        return {"prompt": prompt["text"], "seed": seed, "model": args.model, "height": height, "width": width,
                "steps": args.steps, "guidance": args.guidance, "source": prompt["source"],
                "file": target(seed, prompt).relative_to(args.out).as_posix()}

    # 3. resume: a final file exists only after its os.replace, so existing = finished; it must come from
    # the same settings, else this run would mix two configurations under one name
    pending = []
    for seed, prompt in mine:
        path = target(seed, prompt)
        if not path.exists():
            pending.append((seed, prompt))
            continue
        found, wanted = read_record(path) or {}, record(seed, prompt)
        diff = [k for k in wanted if k != "file" and found.get(k) != wanted[k]]
        if diff:
            raise SystemExit(f"{path}: exists with other {', '.join(diff)} than this run; use another --out or "
                             "--generator")
    for folder in {target(seed, prompt).parent for seed, prompt in mine}:
        folder.mkdir(parents=True, exist_ok=True)
    print(f"images: shard {shard}/{num_shards}: {len(mine)} of {len(work)} images, {len(mine) - len(pending)} "
          f"already done; {height}x{width}, {args.steps} steps, guidance {args.guidance}, {dtype}, {device}, "
          f"offload {args.offload}")

    # 4. generate, one atomic PNG per image
    if pending:
        pipe = load_pipeline(args.model, dtype=dtype, device=device, offload=args.offload,
                             vae_tiling=args.vae_tiling)
        texts = [p["text"] for _, p in pending]
        # verbose=False: over-long texts are the point here, not a mistake to warn about
        over_clip = sum(len(ids) > CLIP_MAX_TOKENS for ids in pipe.tokenizer(texts, verbose=False)["input_ids"])
        over_t5 = sum(len(ids) > args.max_sequence_length
                      for ids in pipe.tokenizer_2(texts, verbose=False)["input_ids"])
        print(f"tokens: {over_clip} of {len(pending)} prompts exceed CLIP's {CLIP_MAX_TOKENS} (the pooled vector "
              f"sees the first {CLIP_MAX_TOKENS}), {over_t5} exceed --max-sequence-length {args.max_sequence_length} "
              "(T5 sees the first ones); the pipeline's per-call truncation warnings are silenced")
        # Counted above once; diffusers would otherwise log every over-long prompt at every call.
        logging.getLogger(type(pipe).__module__).setLevel(logging.ERROR)
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"{args.generator} shard {shard}",
                   unit="img", disable=None)
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start:start + args.batch_size]
            # One CPU generator per image: its noise depends on its seed only, not on batch or device.
            generators = [torch.Generator("cpu").manual_seed(seed) for seed, _ in batch]
            images = pipe(prompt=[p["text"] for _, p in batch], height=height, width=width,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators,
                          max_sequence_length=args.max_sequence_length).images
            for (seed, prompt), image in zip(batch, images):
                save_png_atomic(image, target(seed, prompt), record(seed, prompt))
            bar.update(len(batch))
        bar.close()

    # 5. manifest + split: written once the whole work list is on disk (by whichever shard finishes last),
    # so an early shard never publishes a partial list over a complete one
    missing = sum(not target(seed, prompt).exists() for seed, prompt in work)
    if missing:
        print(f"manifest: {missing} images of other shards still missing; the last shard to finish writes "
              f"{args.out / MANIFEST} (or run: python generate.py merge --out {args.out})")
        return
    count = write_manifest(args.out, args.split)
    print(f"manifest: {count} images -> {args.out / MANIFEST}, split -> {args.out / args.split}")


def cmd_merge(args: argparse.Namespace) -> None:
    """`merge`: rebuild manifest.jsonl and the split from the images on disk."""
    if not args.out.is_dir():
        raise SystemExit(f"--out {args.out}: folder not found")
    count = write_manifest(args.out, args.split)
    print(f"manifest: {count} images -> {args.out / MANIFEST}, split -> {args.out / args.split}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; argv defaults to the command line."""
    args = parse_args(argv)
    {"prompts": cmd_prompts, "images": cmd_images, "merge": cmd_merge}[args.command](args)


if __name__ == "__main__":
    main()
