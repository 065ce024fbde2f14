"""Mask2Former: shapes, the set loss against transformers' Mask2FormerLoss, parameter count of the L head, and the
Mask2Former path of train.py (teacher TTA, image gate, synthetic loss weights, weight decay) against the reference code."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import (BACKBONES, M2F_HEAD_SIZES, M2F_SIZES, Mask2FormerHead, MultiScaleDeformableAttention,
                   build_model, class_scores, hungarian_match, mask2former_loss, mask2former_scores,
                   semantic_to_targets, sine_position_encoding)

m2f_reference = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
Mask2FormerConfig = pytest.importorskip("transformers.models.mask2former.configuration_mask2former").Mask2FormerConfig

# labelled and synthetic settings as SENSE's reference code runs them (github.com/zhang0jhon/SENSE): labelled
# matching with its HungarianMatcher defaults (Mask2Former's configs say 2 / 5 / 5); synthetic dice 2 (below)
SETTINGS = {
    "labelled": dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
                     cost_class=1.0, cost_mask=1.0, cost_dice=1.0),
    "synthetic": dict(class_weight=2.0, mask_weight=5.0, dice_weight=2.0, no_object_weight=0.02,
                      cost_class=1.0, cost_mask=1.0, cost_dice=0.0),
}
POINTS = 64  # few points keep the tests fast; the sampling code path is the same as with 12544


def random_outputs(b=2, q=10, k=5, h=12, w=14, aux=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [{"pred_logits": torch.randn(b, q, k + 1, generator=g), "pred_masks": torch.randn(b, q, h, w, generator=g)}
              for _ in range(aux + 1)]
    return {**layers[-1], "aux_outputs": layers[:-1]}


def random_label(b=2, k=5, height=24, width=28, seed=0):
    """Blocky label maps (4×4 cells) with an ignored band, so masks have structure at the points."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, k, (b, height // 4, width // 4), generator=g)
    label = label.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, H, W)
    label[0, :4] = 255
    return label


def reference_loss(setting, k):
    s = SETTINGS[setting]
    config = Mask2FormerConfig(num_labels=k, train_num_points=POINTS, oversample_ratio=3.0,
                               importance_sample_ratio=0.75, class_weight=s["class_weight"],
                               mask_weight=s["mask_weight"], dice_weight=s["dice_weight"],
                               no_object_weight=s["no_object_weight"])
    loss = m2f_reference.Mask2FormerLoss(config, weight_dict={})
    # the reference ties matching costs to loss weights; the synthetic branch uses its own costs
    loss.matcher = m2f_reference.Mask2FormerHungarianMatcher(
        cost_class=s["cost_class"], cost_mask=s["cost_mask"], cost_dice=s["cost_dice"], num_points=POINTS)
    return loss


def run_reference(loss, outputs, targets):
    aux = [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
           for a in outputs["aux_outputs"]] or None
    return loss(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
                [t["labels"] for t in targets], aux)


def test_semantic_to_targets_one_mask_per_present_class():
    label = torch.tensor([[[0, 0, 3], [3, 255, 255]], [[255, 255, 255], [255, 255, 255]]])
    first, second = semantic_to_targets(label, num_classes=4)
    assert first["labels"].tolist() == [0, 3] and first["labels"].dtype == torch.int64
    assert first["masks"].dtype == torch.float32
    assert first["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [1, 0, 0]]]
    assert second["labels"].numel() == 0 and second["masks"].shape == (0, 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        semantic_to_targets(label, num_classes=3)


@pytest.mark.parametrize("setting", SETTINGS)
def test_matching_equals_transformers(setting):
    s = SETTINGS[setting]
    outputs, targets = random_outputs(), semantic_to_targets(random_label(), 5)
    matcher = m2f_reference.Mask2FormerHungarianMatcher(cost_class=s["cost_class"], cost_mask=s["cost_mask"],
                                                         cost_dice=s["cost_dice"], num_points=POINTS)
    torch.manual_seed(1)
    expected = matcher(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
                       [t["labels"] for t in targets])
    torch.manual_seed(1)
    ours = hungarian_match(outputs["pred_logits"], outputs["pred_masks"], targets, cost_class=s["cost_class"],
                           cost_mask=s["cost_mask"], cost_dice=s["cost_dice"], num_points=POINTS)
    for (rows, cols), (ref_rows, ref_cols) in zip(ours, expected):
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()
        assert len(rows) > 0


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_loss_term_equals_transformers(setting):
    k = 5
    outputs, targets = random_outputs(k=k), semantic_to_targets(random_label(k=k), k)
    torch.manual_seed(1)
    expected = run_reference(reference_loss(setting, k), outputs, targets)
    torch.manual_seed(1)
    ours = mask2former_loss(outputs, targets, num_points=POINTS, **SETTINGS[setting])
    assert len(expected) == 3 * 4 == len(ours) - 1
    for name, value in expected.items():
        torch.testing.assert_close(ours[name.replace("cross_entropy", "ce")], value, rtol=1e-5, atol=1e-6)
    s = SETTINGS[setting]
    total = sum(s["class_weight"] * expected[f"loss_cross_entropy{x}"] + s["mask_weight"] * expected[f"loss_mask{x}"]
                + s["dice_weight"] * expected[f"loss_dice{x}"] for x in ["", "_0", "_1", "_2"])
    torch.testing.assert_close(ours["loss"], total, rtol=1e-5, atol=1e-5)


def test_skip_empty_ce_leaves_images_without_targets_out():
    k = 5
    outputs = random_outputs(k=k, aux=0)
    label = random_label(k=k)
    label[1] = 255  # the second image has no target
    targets = semantic_to_targets(label, k)
    first = {"pred_logits": outputs["pred_logits"][:1], "pred_masks": outputs["pred_masks"][:1], "aux_outputs": []}
    torch.manual_seed(1)  # the first image's matching draw comes first in both runs
    expected = run_reference(reference_loss("synthetic", k), first, targets[:1])["loss_cross_entropy"]
    torch.manual_seed(1)
    skipped = mask2former_loss(outputs, targets, num_points=POINTS, skip_empty_ce=True, **SETTINGS["synthetic"])
    torch.manual_seed(1)
    counted = mask2former_loss(outputs, targets, num_points=POINTS, **SETTINGS["synthetic"])
    torch.testing.assert_close(skipped["loss_ce"], expected)
    assert not torch.isclose(counted["loss_ce"], expected)
    for prediction in outputs, *outputs["aux_outputs"]:
        prediction["pred_logits"].requires_grad_(True)
        prediction["pred_masks"].requires_grad_(True)
    nothing = mask2former_loss(outputs, semantic_to_targets(torch.full_like(label, 255), k), num_points=POINTS,
                               skip_empty_ce=True)
    assert nothing["loss"] == 0 and nothing["loss"].requires_grad  # backward() still works on such a batch


def test_valid_masks_exclude_ignored_pixels():
    """At every pixel centre, point sampling is exact: the losses equal dense ones over valid pixels."""
    k, height, width = 4, 8, 12
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 6, k + 1, generator=g), "pred_masks": torch.randn(1, 6, height, width,
                                                                                             generator=g)}
    label = torch.randint(0, k, (1, height, width), generator=g)
    label[0, :, :3] = 255
    targets, valid = semantic_to_targets(label, k), [label[0] != 255]
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (H*W, 2) as (x, y)
    ours = mask2former_loss(outputs, targets, valid_masks=valid, point_coords=centres)
    (rows, cols), = hungarian_match(outputs["pred_logits"], outputs["pred_masks"], targets, cost_class=1.0,
                                    cost_mask=1.0, cost_dice=1.0, num_points=0, valid_masks=valid,
                                    point_coords=centres)  # mask2former_loss's default costs
    keep = valid[0].flatten()
    logits = outputs["pred_masks"][0, rows].flatten(1)[:, keep]  # (m, valid pixels)
    truth = targets[0]["masks"][cols].flatten(1)[:, keep]
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none").mean(1).sum() / len(cols)
    p = logits.sigmoid()
    dice = (1 - (2 * (p * truth).sum(1) + 1) / (p.sum(1) + truth.sum(1) + 1)).sum() / len(cols)
    torch.testing.assert_close(ours["loss_mask"], bce)
    torch.testing.assert_close(ours["loss_dice"], dice)
    as_negative = mask2former_loss(outputs, targets, point_coords=centres)
    assert not torch.isclose(as_negative["loss_mask"], bce)
    all_valid = mask2former_loss(outputs, targets, valid_masks=[torch.ones_like(valid[0])], point_coords=centres)
    torch.testing.assert_close(all_valid["loss"], as_negative["loss"])


def test_deformable_attention_equals_transformers_kernel():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(width=32, heads=4, levels=3, points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)  # non-trivial offsets and weights
    torch.nn.init.normal_(attn.attention_weights.weight)
    shapes = [(3, 2), (5, 4), (9, 7)]
    n = sum(h * w for h, w in shapes)
    x = torch.randn(2, n, 32)
    reference = torch.rand(n, 2)
    ours = attn(x, reference, x, shapes)
    offsets = attn.sampling_offsets(x).view(2, n, 4, 3, 2, 2)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locations = reference[None, :, None, None, None] + offsets / size[:, None]
    weights = attn.attention_weights(x).view(2, n, 4, 6).softmax(-1).view(2, n, 4, 3, 2)
    value = attn.value_proj(x).view(2, n, 4, 8)
    expected = attn.output_proj(m2f_reference.multi_scale_deformable_attention(value, shapes, locations, weights))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sine_position_encoding_equals_transformers():
    encoding = m2f_reference.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)
    expected = encoding((1, 32, 5, 7), "cpu", torch.float32)  # (1, 32, 5, 7)
    torch.testing.assert_close(sine_position_encoding(5, 7, 32), expected[0].flatten(1).T)


@pytest.mark.parametrize("grid", [(5, 7), (1, 3)])
@pytest.mark.parametrize("encoder_layers", [1, 0])
def test_head_shapes_odd_grids(grid, encoder_layers):
    size = M2F_SIZES["toy"]
    head = Mask2FormerHead(48, 7, type(size)(**{**size.__dict__, "encoder_layers": encoder_layers}))
    h, w = grid
    out = head([torch.randn(2, 48, h, w) for _ in range(4)])
    assert out["pred_logits"].shape == (2, size.queries, 8)
    assert out["pred_masks"].shape == (2, size.queries, 4 * h, 4 * w)
    assert len(out["aux_outputs"]) == size.decoder_layers
    assert all(a["pred_masks"].shape == out["pred_masks"].shape for a in out["aux_outputs"])


@pytest.mark.parametrize("backbone, image_size", [("toy", (40, 56)), ("dinov2_s", (42, 70))])
def test_model_shapes_and_class_scores(backbone, image_size):
    """Both backbone families, grids of odd size (5×7 and 3×5 patches); semantic scores at image size."""
    torch.manual_seed(0)
    model = build_model("mask2former", backbone, 7, pretrained=False).eval()
    size = M2F_SIZES[M2F_HEAD_SIZES[backbone]]
    images = torch.randn(1, 3, *image_size)
    h, w = image_size[0] // model.patch_size, image_size[1] // model.patch_size
    captured = []  # one forward (CPU time): the raw outputs are caught on their way into class_scores
    model.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        scores = class_scores(model, images)
    out, = captured
    assert model.arch == "mask2former" and model.num_classes == 7
    assert out["pred_logits"].shape == (1, size.queries, 8)
    assert out["pred_masks"].shape == (1, size.queries, 4 * h, 4 * w)
    assert len(out["aux_outputs"]) == size.decoder_layers
    assert scores.shape == (1, 7, *image_size) and bool((scores >= 0).all())
    assert bool(scores.sum(1).le(size.queries).all())  # each query spreads at most probability 1 over K
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    assert n_backbone + n_head == sum(p.numel() for p in model.parameters())  # the two AdamW groups


def test_every_backbone_has_a_head_size():
    assert set(M2F_HEAD_SIZES) == set(BACKBONES) and set(M2F_HEAD_SIZES.values()) <= set(M2F_SIZES)


def test_queries_with_empty_masks_attend_everywhere():
    """A query whose mask is background at every pixel must not produce NaN through masked attention."""
    head = Mask2FormerHead(48, 7, M2F_SIZES["toy"])
    last = head.decoder.mask_embed[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)
        head.pixel_decoder.mask_proj.weight.zero_()
        head.pixel_decoder.mask_proj.bias.fill_(1.0)  # every mask logit = -D < 0
    out = head([torch.randn(1, 48, 4, 4) for _ in range(4)])
    assert bool(torch.isfinite(out["pred_logits"]).all())


def test_training_step_reaches_every_head_parameter():
    head = Mask2FormerHead(48, 7, M2F_SIZES["toy"])
    out = head([torch.randn(2, 48, 6, 6) for _ in range(4)])
    label = random_label(k=7, height=48, width=48)
    losses = mask2former_loss(out, semantic_to_targets(label, 7), num_points=POINTS,
                              valid_masks=list(label != 255))
    losses["loss"].backward()
    assert math.isfinite(losses["loss"].item())
    assert [n for n, p in head.named_parameters() if p.grad is None] == []


def test_parameter_count_of_the_l_head():
    """SENSE's head on DINOv3-L taps (C = 1024), K = 19; built without the backbone."""
    head = Mask2FormerHead(1024, 19, M2F_SIZES["L"])
    count = sum(p.numel() for p in head.parameters())
    print(f"Mask2Former L head (C=1024, K=19): {count / 1e6:.2f} M parameters")
    assert 33.3e6 < count < 33.5e6
    assert len(head.decoder.layers) == 9 and len(head.pixel_decoder.layers) == 6


# ---- the Mask2Former path as the reference code runs it (github.com/zhang0jhon/SENSE, sense_mask2former.py)

def test_synthetic_loss_weights_are_what_the_reference_sums():
    """The reference sums the synthetic terms by key name: `if "dice" in k` (weight 0), `if "mask" in k` (5),
    `elif "ce" in k` (2). "loss_dice" contains "ce", so each dice term also enters with the CE weight 2."""
    import train
    k = 5
    outputs, targets = random_outputs(k=k), semantic_to_targets(random_label(k=k), k)
    torch.manual_seed(1)
    ours = mask2former_loss(outputs, targets, num_points=POINTS, **train.M2F_SYNTHETIC)
    weight = dict(loss_dice=0.0, loss_mask=5.0, loss_ce=2.0)  # the reference's weight_dict of that criterion
    total = 0
    for key, value in ours.items():
        if key == "loss":
            continue
        if "dice" in key:
            total = total + value * weight["loss_dice"]
        if "mask" in key:
            total = total + value * weight["loss_mask"]
        elif "ce" in key:
            total = total + value * weight["loss_ce"]
    torch.testing.assert_close(ours["loss"], total)
    torch.manual_seed(1)
    paper = mask2former_loss(outputs, targets, num_points=POINTS, **{**train.M2F_SYNTHETIC, "dice_weight": 0.0})
    dice = sum(value for key, value in ours.items() if key.startswith("loss_dice"))
    torch.testing.assert_close(ours["loss"] - paper["loss"], 2 * dice)  # the paper's text: dice 0
    assert dice > 0.1


def test_labelled_matching_defaults_are_the_reference_matcher_costs():
    """The labelled criterion of the reference: HungarianMatcher defaults 1 / 1 / 1, loss weights 2 / 5 / 5."""
    k = 5
    outputs, targets = random_outputs(k=k), semantic_to_targets(random_label(k=k), k)
    torch.manual_seed(1)
    expected = run_reference(reference_loss("labelled", k), outputs, targets)
    torch.manual_seed(1)
    ours = mask2former_loss(outputs, targets, num_points=POINTS)  # defaults, as train.py's labelled branch
    for name, value in expected.items():
        torch.testing.assert_close(ours[name.replace("cross_entropy", "ce")], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)  # the costs matter on these outputs: Mask2Former's 2 / 5 / 5 match otherwise
    other = mask2former_loss(outputs, targets, num_points=POINTS, cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    assert not torch.isclose(other["loss"], ours["loss"])


def test_mask2former_scores_sum_sigmoids_at_stride_4_then_upsample():
    # one query, all its class probability on class 0 (K = 1), mask logits [-10, 0] on a 1×2 grid, upsampled
    # to 1×4: bilinear (align_corners=False) samples the 1×2 map at x = 0 (clamped), 0.25, 0.75, 1 (clamped)
    out = {"pred_logits": torch.tensor([[[0.0, -100.0]]]), "pred_masks": torch.tensor([[[[-10.0, 0.0]]]])}
    scores = mask2former_scores(out, (1, 4))  # (1, 1, 1, 4)
    low, high = 1 / (1 + math.exp(10)), 0.5  # the two sigmoids
    expected = torch.tensor([low, 0.75 * low + 0.25 * high, 0.25 * low + 0.75 * high, high])
    torch.testing.assert_close(scores[0, 0, 0], expected)
    # Mask2Former's own order (upsample the logits, then the sigmoid) gives sigmoid(-7.5) = 0.00055 at x = 0.25
    assert scores[0, 0, 0, 1] > 0.1


class _QueriesFromImage(nn.Module):
    """Mask2Former stand-in: 3 queries whose mask logits are the image channels pooled to stride 4 and whose
    class logits (K = 2 + no-object) read the image's left and right halves, so that flips and resizes change
    both."""
    arch, patch_size, num_classes = "mask2former", 8, 2

    def forward(self, images):
        w = images.shape[-1]
        left, right = images[..., :w // 2].mean((2, 3)), images[..., w // 2:].mean((2, 3))  # (B, 3) each
        logits = 3 * torch.stack([left - right, right, left * right], dim=-1)  # (B, Q = 3, K + 1 = 3)
        return {"pred_logits": logits, "pred_masks": 4 * F.avg_pool2d(images, 4), "aux_outputs": []}


class _PixelLogits(nn.Module):
    """DPT stand-in: a fixed per-pixel linear map of the image to K = 3 logits, at the image size."""
    arch, patch_size, num_classes = "dpt", 8, 3

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return torch.einsum("kc,bchw->bkhw", self.weight, images)


def _reference_teacher(model, images, big):
    """Transcription of the reference's teacher step, TTA over scales {crop, big} × flip on the first half:
    sense_dpt.py (resizes with align_corners=True) and sense_mask2former.py (its configs' False; scores summed
    at stride 4, then resized to the crop; class logits averaged over the views)."""
    crop, half = images.shape[-1], images.shape[0] // 2
    dpt = model.arch == "dpt"
    resize = lambda x, s: F.interpolate(x, (s, s), mode="bilinear", align_corners=dpt)  # noqa: E731

    def scores(out, flip):
        if dpt:
            return resize(out.flip(3) if flip else out, crop)
        masks = out["pred_masks"].flip(3) if flip else out["pred_masks"]
        return resize(torch.einsum("bqc,bqhw->bchw", out["pred_logits"].softmax(-1)[..., :-1], masks.sigmoid()), crop)

    results, logits = [], []
    for size in (crop, big):
        x = resize(images[:half], size)
        for flip in (False, True):
            out = model(x.flip(3) if flip else x)
            results.append(scores(out, flip))
            logits.append(None if dpt else out["pred_logits"])
    out = model(images[half:])
    result = torch.cat([torch.stack(results).mean(0), scores(out, False)])
    if dpt:
        return result, None
    logits = torch.cat([torch.stack(logits).mean(0), out["pred_logits"]])
    return result, logits.softmax(-1).max(-1)[0].mean(-1)


@pytest.mark.parametrize("stand_in", [_PixelLogits, _QueriesFromImage])
def test_teacher_tta_equals_the_reference(stand_in):
    import train
    model = stand_in()
    images = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    scores, query_conf = train.teacher_predict(model, images, "scales")
    expected, expected_conf = _reference_teacher(model, images, big=32)  # 24 + round(0.25 · 24 / 8) · 8
    assert scores.shape == (4, model.num_classes, 24, 24)
    torch.testing.assert_close(scores, expected)
    if expected_conf is None:
        assert query_conf is None
    else:
        torch.testing.assert_close(query_conf, expected_conf)
        plain = model(images)["pred_logits"].softmax(-1).amax(-1).mean(1)  # the plain pass's confidence
        assert (query_conf[:2] - plain[:2]).abs().max() > 1e-3 and torch.allclose(query_conf[2:], plain[2:])


class _MirrorQueries(nn.Module):
    """One query sure of class 0 for an image brighter on the left, of class 1 for its mirror image."""
    arch, patch_size, num_classes = "mask2former", 4, 2

    def forward(self, images):
        b, _, h, w = images.shape
        d = images[:, 0, :, :w // 2].mean((1, 2)) - images[:, 0, :, w // 2:].mean((1, 2))  # (B,)
        logits = torch.stack([10 * d, -10 * d, torch.full_like(d, -20.0)], dim=-1)[:, None]  # (B, 1, K + 1)
        return {"pred_logits": logits, "pred_masks": torch.zeros(b, 1, h // 4, w // 4), "aux_outputs": []}


def test_image_gate_reads_the_class_logits_averaged_over_the_tta_views():
    import train
    images = torch.ones(4, 3, 8, 8)
    images[..., 4:] = -1  # every image brighter on the left: each single view is sure (p ≈ 1)
    _, query_conf = train.teacher_predict(_MirrorQueries(), images, "flip")
    # the first half averages the logits of the view and its mirror: 0 / 0 for the two classes, p = 0.5
    torch.testing.assert_close(query_conf, torch.tensor([0.5, 0.5, 1.0, 1.0]), atol=1e-6, rtol=0)


def test_image_gate_covers_the_whole_cutmixed_image():
    import train
    k = 3
    label = torch.tensor([1, 2])[:, None, None].expand(2, 8, 8)  # image 0 all class 1, image 1 all class 2
    targets = F.one_hot(label, k).permute(0, 3, 1, 2).float()  # (2, K, 8, 8), sure everywhere
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[:, 2:6, 2:6] = True
    mixed = train.cutmix(targets, box)  # image 0 gets image 1's pixels inside the box, and back
    ignore = torch.zeros(2, 8, 8, dtype=torch.bool)
    ignore[0, 0] = True  # a padding row
    gate = (mixed.amax(1) >= 0.95) & ~ignore
    args = argparse.Namespace(method="sense", conf_thresh=0.95)
    label_u, trained = train.synthetic_labels(mixed, gate, torch.tensor([0.99, 0.5]), args)
    assert (trained == (label_u != 255)).all()
    assert (label_u[0][box[0]] == 2).all()  # the box pasted from the unsure image 1 is kept: image 0 is sure
    assert (label_u[0][~box[0] & ~ignore[0]] == 1).all() and (label_u[0, 0] == 255).all()
    assert (label_u[1] == 255).all()  # image 1 is dropped whole, its box from the sure image 0 included


def test_queries_and_level_embeddings_train_without_weight_decay():
    import train
    torch.manual_seed(0)
    model = build_model("mask2former", "toy", 7, pretrained=False)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = train.param_groups(model, 1e-3, 10.0, 0.05)
    no_decay = sorted(names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"])
    assert no_decay == ["head.decoder.level_embed.weight", "head.decoder.query_embed.weight",
                        "head.decoder.query_feat.weight", "head.pixel_decoder.level_embed"]
    assert sorted(names[id(p)] for g in groups for p in g["params"]) == sorted(names.values())  # each once
    backbone = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        assert g["lr"] == g["base"] == (1e-3 if id(g["params"][0]) in backbone else 1e-2)
    # one AdamW step with zero gradients: decayed parameters shrink by 1 − lr · wd, the four others stay put
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        lr = 1e-3 if id(p) in backbone else 1e-2
        shrink = 1.0 if name in no_decay else 1 - lr * 0.05
        torch.testing.assert_close(p.detach(), before[name] * shrink)
    dpt = build_model("dpt", "toy", 7, pretrained=False)
    assert [g["weight_decay"] for g in train.param_groups(dpt, 1e-3, 10.0, 0.05)] == [0.05, 0.05]


def test_set_loss_points_are_mask2formers_for_real_heads_and_fewer_for_the_toy():
    import argparse
    import train
    for backbone, head in M2F_HEAD_SIZES.items():
        points = train.m2f_points(argparse.Namespace(backbone=backbone))
        assert points == (1024 if head == "toy" else 12544), backbone  # 12544 = 112², Mask2Former's own
