"""Tests of generate.py (docs/generate.md): prompt import and building, and the real `images` command run as a
subprocess on a tiny Flux pipeline with random weights built here (CPU, no downloads, 64x64, 2 steps).

    pytest tests/test_generate.py
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import generate

REPO = Path(__file__).resolve().parents[1]
# The first two lines of the reference Cityscapes captions (../shared/prompts/), one file per captioner;
# they differ in the file_name variant ("data/cityscapes/leftImg8bit/..." vs "leftImg8bit/...").
GEMINI_LINES = (
    '{"file_name": "data/cityscapes/leftImg8bit/train/hanover/hanover_000000_055592_leftImg8bit.png", "te'
    'xt": "A two-lane gray asphalt road occupies the foreground and midground, underneath a concrete over'
    'pass. White painted lines mark the lanes. The upper-right corner of the image shows a square, dark g'
    'ray building with a white rectangular section and what appears to be posters on its facade. To the l'
    'eft of the building is a white concrete overpass support structure, which also has a large opening t'
    'hat reveals greenery in the distance. To the immediate left is a tall traffic light pole with two da'
    'rk gray pedestrian \\"Walk/Don\'t Walk\\" signs and a vertical stack of three dark gray traffic lights.'
    ' The overpass support structure to the left is also concrete. A red and white striped traffic sign o'
    'n a pole, with a red circle and white horizontal bar, is visible to the right of the building. In th'
    'e bottom center, a three-pointed Mercedes-Benz logo, silver and reflective, is visible. It sits on a'
    ' dark, reflective surface, likely the hood of a car.\\n\\nOn the left side of the road, a silver car i'
    's partially visible and parked near the edge of the frame. In the midground, a red and white diagona'
    'lly striped traffic sign with a blue circular sign on top, indicating a left turn with a white arrow'
    ', is visible. To the left is a concrete sidewalk. Behind the sidewalk are several trees with green f'
    'oliage. In the midground, to the right of the traffic light, two individuals are visible on bicycles'
    ', with their figures silhouetted against the bright background. Another individual on a bicycle is v'
    'isible further to the left. A fourth person on a bicycle is also silhouetted in the distant backgrou'
    'nd. Buildings and trees are visible in the background under a cloudy sky."}',
    '{"file_name": "data/cityscapes/leftImg8bit/train/stuttgart/stuttgart_000033_000019_leftImg8bit.png",'
    ' "text": "A vibrant urban street scene, with a dark gray asphalt road in the foreground and stretchi'
    'ng into the background. The road is marked with white lines and arrows for traffic direction. In the'
    ' foreground, a dark gray car partially visible at the bottom of the image. The center of the image s'
    'hows a silver Volkswagen Golf car. To the left, a silver car is turning, and to the right, two dark '
    'gray cars are stationary.\\n\\nOn the left side of the road, groups of pedestrians, composed of seven '
    'people, are seen crossing the street on a white-striped crosswalk. Behind them, a gray-toned buildin'
    'g with multiple windows. A traffic light, showing a red light, hangs above the traffic.\\n\\nOn the ri'
    'ght side of the image, two additional pedestrians are seen crossing the street. In the mid-ground, a'
    ' vibrant green tree and several other dark gray buildings are visible. The sky is partially visible '
    'through gaps in the tree leaves at the top of the image. Numerous traffic lights, utility poles, and'
    ' street signs are scattered throughout the image, adding to the bustling urban atmosphere."}',
)
GEMMA3_LINES = (
    '{"file_name": "leftImg8bit/train/hanover/hanover_000000_055592_leftImg8bit.png", "text": "A wide roa'
    'd occupies the foreground, marked with white dashed lines. A silver car is visible on the left side '
    'of the road, its rear facing the viewer. Several people on bicycles are riding along the road, posit'
    'ioned towards the center and right. A traffic sign displaying a red circle with a white horizontal b'
    'ar is centered under an overpass. Another traffic sign with a blue background and white arrow is sit'
    'uated on the left side of the road. A traffic light with a green signal is positioned next to the re'
    'd circle sign. A tall concrete wall extends along the sides of the road, and a row of trees with den'
    'se vegetation is visible in the background. The sky is overcast and grey, visible through the openin'
    'g of the overpass. A sidewalk runs alongside the road."}',
    '{"file_name": "leftImg8bit/train/stuttgart/stuttgart_000033_000019_leftImg8bit.png", "text": "A wide'
    ' road with multiple lanes is visible, marked with white lane dividers and pedestrian crossing stripe'
    's. Several cars are present: a silver car, a white hatchback facing away, a dark colored SUV, and ot'
    'her vehicles in the distance. A small group of people are crossing the road at a pedestrian crossing'
    '. Tall buildings with glass facades line the sides of the road. A traffic light is positioned overhe'
    'ad. A traffic sign is mounted on a pole. A sidewalk runs alongside the road. The sky is overcast."}',
)

# Prompts of every images run: three prompts x seeds 0 and 1 = six images; all words are in the tiny vocabulary.
RUN_PROMPTS = ["a photo of a street scene with a car on the left",
               "a road at the bottom and a tree on the right",
               "a person in the center of a street"]
SIZE_FLAGS = ["--height", "64", "--width", "64", "--steps", "2"]


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_prompts(path: Path, texts: list[str]) -> Path:
    return write_lines(path, [json.dumps({"source": f"leftImg8bit/train/x/img{i:03d}_leftImg8bit.png", "text": t})
                              for i, t in enumerate(texts)])


def start_generate(*args: str, log: Path) -> subprocess.Popen:
    """Start `python generate.py ...` offline and outside torchrun (no RANK/WORLD_SIZE inherited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread: the models are tiny, and on a shared CPU more threads only wait for each other (10x slower).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    with open(log, "w") as f:  # a file, not a pipe: concurrent runs never block on a full pipe
        return subprocess.Popen([sys.executable, str(REPO / "generate.py"), *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a run; fail with the tail of its output unless it succeeded; return the output."""
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    return output


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A FluxPipeline with random weights and word-level tokenizers, saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for text in RUN_PROMPTS for w in text.split()})

    def tokenizer(with_bos: bool, max_length: int) -> PreTrainedTokenizerFast:
        """Word-level; adds <s> ... </s> like CLIP (with_bos) or ... </s> like T5."""
        vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, **{w: 4 + i for i, w in enumerate(words)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.post_processor = TemplateProcessing(single="<s> $A </s>" if with_bos else "$A </s>",
                                                    special_tokens=[("<s>", 2), ("</s>", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                       bos_token="<s>", eos_token="</s>", model_max_length=max_length)

    torch.manual_seed(0)
    vocab_size = 4 + len(words)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3,
                                 decoder_start_token_id=0))
    # in_channels = 4 latent channels x a 2x2 patch; joint/pooled dims = the T5 / CLIP widths
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    # four blocks -> 8x downsampling, as in Flux's VAE
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[4, 4, 4, 4], layers_per_block=1, latent_channels=4, norm_num_groups=2,
                        sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer(True, 77), text_encoder_2=t5,
                        tokenizer_2=tokenizer(False, 512), transformer=transformer)
    path = tmp_path_factory.mktemp("tiny_flux")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def runs(tiny_flux, tmp_path_factory) -> dict[str, Path]:
    """Four runs of the same work (three prompts x seeds 0 and 1), started together to share the import time:
    `single` uninterrupted, `shards` as --shard 0/2 and 1/2 (concurrently, no coordination), `killed`
    SIGKILLed right after its first image."""
    tmp = tmp_path_factory.mktemp("runs")
    prompts = write_prompts(tmp / "prompts.jsonl", RUN_PROMPTS)
    common = ["images", "--model", str(tiny_flux), "--prompts", str(prompts), "--seeds", "0", "1", *SIZE_FLAGS]
    out = {name: tmp / name for name in ("single", "shards", "killed")}
    procs = {"single": start_generate(*common, "--out", str(out["single"]), log=tmp / "single.log"),
             "shard0": start_generate(*common, "--out", str(out["shards"]), "--shard", "0/2", log=tmp / "shard0.log"),
             "shard1": start_generate(*common, "--out", str(out["shards"]), "--shard", "1/2", log=tmp / "shard1.log"),
             "killed": start_generate(*common, "--out", str(out["killed"]), log=tmp / "killed.log")}
    deadline = time.time() + 300
    while not list(out["killed"].glob("*_seed*/*.png")) and procs["killed"].poll() is None and time.time() < deadline:
        time.sleep(0.005)
    procs["killed"].send_signal(signal.SIGKILL)
    procs["killed"].wait()
    for name in ("single", "shard0", "shard1"):
        finish(procs[name], tmp / f"{name}.log")
    return {**out, "prompts": prompts, "model": tiny_flux, "killed_log": tmp / "killed.log"}


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small toy world (40 labelled training images; the default world takes 20x longer to write)."""
    root = tmp_path_factory.mktemp("toy")
    data.make_toy_world(root, counts={split: 40 if split == "train" else 1 for split in data.TOY_SPLITS})
    return root


# ------------------------------------------------------------------------------------------- prompts

def test_import_both_reference_variants(tmp_path, capsys):
    names = {}
    for tag, lines in (("gemini", GEMINI_LINES), ("gemma3", GEMMA3_LINES)):
        captions = write_lines(tmp_path / f"{tag}.jsonl", lines)
        generate.main(["prompts", "--captions", str(captions), "--out", str(tmp_path / f"{tag}_prompts.jsonl")])
        records = [json.loads(line) for line in (tmp_path / f"{tag}_prompts.jsonl").read_text().splitlines()]
        originals = [json.loads(line) for line in lines]
        assert [r["source"] for r in records] == [o["file_name"] for o in originals]  # kept as given
        assert [r["text"] for r in records] == [o["text"] for o in originals]  # short enough for T5: not cut
        assert all(r["clip_tokens"] > generate.CLIP_MAX_TOKENS and not r["truncated"] for r in records)
        names[tag] = [generate.output_name(r["source"]) for r in records]
    # both variants name the synthetic image after the same source basename
    assert names["gemini"] == names["gemma3"] == ["hanover_000000_055592_leftImg8bit.png",
                                                  "stuttgart_000033_000019_leftImg8bit.png"]
    assert "at least 2 of 2 exceed CLIP's 77" in capsys.readouterr().out


def test_long_prompt_cut_visibly_at_t5_limit(tmp_path, capsys):
    long_text = " ".join(f"word{i}," for i in range(400))  # 800 approximate tokens
    captions = write_lines(tmp_path / "long.jsonl", [json.dumps({"file_name": "a/b.png", "text": long_text})])
    generate.main(["prompts", "--captions", str(captions), "--out", str(tmp_path / "p.jsonl")])
    record = json.loads((tmp_path / "p.jsonl").read_text())
    assert record["truncated"] and record["t5_tokens"] == 801  # original count kept
    assert long_text.startswith(record["text"])
    kept = len(generate.APPROX_TOKEN.findall(record["text"])) + generate.T5_SPECIAL_TOKENS
    assert kept == generate.T5_MAX_TOKENS
    assert "1 exceed T5's 512 (cut to 512" in capsys.readouterr().out


def test_exact_counts_with_pipeline_tokenizers(tiny_flux, tmp_path):
    from transformers import AutoTokenizer
    captions = write_lines(tmp_path / "c.jsonl", [json.dumps({"file_name": "x.png", "text": RUN_PROMPTS[0]})])
    generate.main(["prompts", "--captions", str(captions), "--tokenizers", str(tiny_flux),
                   "--out", str(tmp_path / "p.jsonl")])
    record = json.loads((tmp_path / "p.jsonl").read_text())
    clip = AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer_2")
    assert record["clip_tokens"] == len(clip(RUN_PROMPTS[0])["input_ids"]) == len(RUN_PROMPTS[0].split()) + 2
    assert record["t5_tokens"] == len(t5(RUN_PROMPTS[0])["input_ids"]) == len(RUN_PROMPTS[0].split()) + 1


def test_bad_prompt_files_fail_in_one_line(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"file_name": "a.png", "text": "ok"}', '{"name": "b.png"}'])
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: expected keys 'file_name'"):
        generate.load_prompts(bad)
    twice = write_lines(tmp_path / "twice.jsonl", ['{"file_name": "x/a.png", "text": "1"}',
                                                   '{"file_name": "y/a.png", "text": "2"}'])
    with pytest.raises(SystemExit, match="prompts 1 and 2 both name the output a.png"):
        generate.main(["images", "--model", "m", "--prompts", str(twice), "--out", str(tmp_path), *SIZE_FLAGS])
    with pytest.raises(SystemExit, match="--height 60: expected a positive multiple of 16"):
        generate.main(["images", "--model", "m", "--prompts", str(bad), "--out", str(tmp_path),
                       "--height", "60", "--width", "64"])


def test_missing_diffusers_is_one_clear_line(monkeypatch):
    import torch
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(SystemExit, match="needs diffusers: pip install diffusers"):
        generate.load_pipeline("m", dtype=torch.float32, device=torch.device("cpu"), offload="none",
                               vae_tiling=False)


def test_dense_and_sparse_prompts_from_toy_labels(toy_root, tmp_path):
    stats = generate.label_statistics("toy", toy_root)
    classes = data.DATASETS["toy"].classes
    built = {kind: generate.build_prompts(stats, classes, kind=kind, num=40, seed=0, scene="a toy world")
             for kind in ("dense", "sparse")}
    # reproducible by seed, different for another seed
    assert built["dense"] == generate.build_prompts(stats, classes, kind="dense", num=40, seed=0, scene="a toy world")
    assert built["dense"] != generate.build_prompts(stats, classes, kind="dense", num=40, seed=1, scene="a toy world")
    sparse_sizes = [len(p["classes"]) for p in built["sparse"]]
    dense_sizes = [len(p["classes"]) for p in built["dense"]]
    assert set(sparse_sizes) <= {1, 2} and 2 in sparse_sizes
    assert np.mean(dense_sizes) > np.mean(sparse_sizes) + 1
    index = {name: k for k, name in enumerate(classes)}
    spatial = [w for row in generate.SPATIAL_WORDS for w in row]
    for prompt in built["dense"] + built["sparse"]:
        ids = [index[name] for name in prompt["classes"]]
        assert len(set(ids)) == len(ids) and "background" not in prompt["classes"]
        # every pair of classes in a prompt co-occurs in at least one real training label
        assert all(stats["cooccurrence"][a, b] > 0 for a in ids for b in ids)
        # each class comes with a spatial word
        assert all(any(f"{generate.class_phrase(name)} {w}" in prompt["text"] for w in spatial)
                   for name in prompt["classes"])
    # the CLI writes the same prompts (one per training image by default)
    generate.main(["prompts", "--dataset", "toy", "--data-root", str(toy_root), "--kind", "sparse", "--num", "40",
                   "--seed", "0", "--scene", "a toy world", "--out", str(tmp_path / "sparse.jsonl")])
    written = [json.loads(line) for line in (tmp_path / "sparse.jsonl").read_text().splitlines()]
    assert [(p["source"], p["text"]) for p in written] == [(p["source"], p["text"]) for p in built["sparse"]]
    assert written[0]["source"] == "sparse_000000.png"


# -------------------------------------------------------------------------------------------- images

def test_images_files_manifest_split_and_seeds(runs):
    single = runs["single"]
    manifest = [json.loads(line) for line in (single / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6 and len({r["file"] for r in manifest}) == 6
    assert [r["file"] for r in manifest] == sorted(r["file"] for r in manifest)
    first = next(r for r in manifest if r["file"] == "flux_seed1/img000_leftImg8bit.png")
    assert first["prompt"] == RUN_PROMPTS[0] and first["seed"] == 1 and first["model"] == str(runs["model"])
    assert (first["height"], first["width"], first["steps"]) == (64, 64, 2)
    assert first["source"] == "leftImg8bit/train/x/img000_leftImg8bit.png"
    for record in manifest:
        assert pixels(single / record["file"]).shape == (64, 64, 3)  # relative to the manifest's folder
    # the split file lists the same images, one path per line relative to its folder, readable by data.py
    split = data.read_split(single / "synthetic.txt")
    assert [Path(image).resolve() for image, _ in split] == [(single / r["file"]).resolve() for r in manifest]
    assert all(label is None for _, label in split)
    # different seeds give different images for the same prompt; no temporary files are left behind
    assert not np.array_equal(pixels(single / "flux_seed0/img000_leftImg8bit.png"),
                              pixels(single / "flux_seed1/img000_leftImg8bit.png"))
    assert not list(single.rglob("*.tmp"))
    # train.py's reader takes the split file as it is
    image_w, image_s, ignore_mask, cutmix_box = data.SyntheticDataset(single / "synthetic.txt", crop_size=48,
                                                                      patch_size=8)[0]
    assert image_w.shape == image_s.shape == (3, 48, 48) and ignore_mask.shape == (48, 48)


def assert_same_as_single_run(out: Path, single: Path) -> None:
    """Byte-identical manifest and split, pixel-identical images (deterministic per seed)."""
    assert (out / "manifest.jsonl").read_text() == (single / "manifest.jsonl").read_text()
    assert (out / "synthetic.txt").read_text() == (single / "synthetic.txt").read_text()
    for line in (single / "synthetic.txt").read_text().split():
        assert np.array_equal(pixels(out / line), pixels(single / line))


def test_two_shards_equal_one_run(runs):
    assert_same_as_single_run(runs["shards"], runs["single"])


def test_resume_after_kill(runs, tmp_path):
    out = runs["killed"]
    done = sorted(out.glob("*_seed*/*.png"))
    assert 1 <= len(done) < 6, f"not killed mid-run: {runs['killed_log'].read_text()[-2000:]}"
    for path in done:  # every visible file is a complete image carrying its record
        assert pixels(path).shape == (64, 64, 3)
        assert generate.read_record(path)["file"] == path.relative_to(out).as_posix()
    assert not (out / "manifest.jsonl").exists()
    before = {p: p.stat().st_mtime_ns for p in done}

    output = finish(start_generate("images", "--model", str(runs["model"]), "--prompts", str(runs["prompts"]),
                                   "--seeds", "0", "1", *SIZE_FLAGS, "--out", str(out), log=tmp_path / "resume.log"),
                    tmp_path / "resume.log")
    assert f"6 of 6 images, {len(done)} already done" in output
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished files are not redone
    # no duplicates, none missing, no truncated image: the same files as the uninterrupted run
    assert_same_as_single_run(out, runs["single"])
