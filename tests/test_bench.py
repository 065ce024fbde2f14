"""bench.py gpu runs its whole table on a CPU at toy sizes (the code path a GPU run takes, minus CUDA)."""
import json

import bench


def test_gpu_bench_tiny_on_cpu_prints_every_row(tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    bench.bench_gpu(["--device", "cpu", "--tiny", "--steps", "1", "--json", str(out)])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]  # minus header
    labels = [row.split(" | ")[0] for row in rows]
    for setting in ("dpt toy crop 64", "mask2former toy crop 64"):
        for what in ("training step", "peak memory", "teacher / OT share of the step"):
            assert any(label.startswith(f"| {what}, {setting}") for label in labels), (what, setting)
    assert any(label.startswith("| deformable attention share of the step, mask2former") for label in labels)
    assert not any("deformable" in label and "dpt" in label for label in labels)  # DPT has no deformable attention
    for K in (19, 150):
        for marginal in ("uniform", "present"):
            assert any(f"sinkhorn {marginal} vs exp-domain form, K = {K}," in label for label in labels)
    assert any("denormals" in label for label in labels) and any("GLCM throughput" in label for label in labels)
    result = json.loads(out.read_text())
    assert len(result["training"]) == 2 and len(result["sinkhorn"]) == 2
    for r in result["training"]:
        assert r["s_per_step"] > 0 and 0 < r["teacher_share"] < 1 and 0 < r["ot_share"] < 1
    assert 0 < result["training"][1]["deform_share"] < 1
    assert isinstance(result["denormals_kept"], bool) and result["glcm"]["images_per_s"] > 0


def test_train_bench_splits_the_toy_step_into_parts_that_add_up(tmp_path, capsys):
    bench.bench_train(["--steps", "2", "--warmup", "1", "--data-root", str(tmp_path / "toy")])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    for part in ("data", "teacher", "ot", "student", "optimizer + EMA", "statistics + log", "loop remainder"):
        assert part in rows, part
    amortised = [name for name in rows if name.startswith(("panel (1 per", "evaluation (1 per", "checkpoint (1 per",
                                                          "final table (1 per"))]
    assert len(amortised) == 4 and "evaluation (1 per 300 steps)" in amortised  # the toy preset's interval
    parts = [name for name in rows if "(1 per" in name or name in ("data", "teacher", "ot", "student",
                                                                   "optimizer + EMA", "statistics + log",
                                                                   "loop remainder")]
    total = float(rows["**step**"][0].strip("*"))
    assert abs(sum(float(rows[name][0]) for name in parts) - total) < 0.1 * len(parts)  # rounding of each row
    assert all(float(rows[name][0]) > 0 for name in ("data", "teacher", "ot", "student", "optimizer + EMA"))
    # FLOPs per model part: every ViT block and the head's stages, adding up to the forward pass
    forward = float(rows["**forward, one crop**"][0].strip("*"))
    blocks = [name for name in rows if name.startswith("backbone.blocks.")]
    assert len(blocks) == 4 and "head.classifier" in rows and "head.path_1" in rows
    model_parts = [name for name in rows if name.startswith(("backbone.", "head."))]
    assert abs(sum(float(rows[name][0]) for name in model_parts) - forward) < 0.05 * len(model_parts)
    assert "GFLOP/s" in out and "matmul" in out
