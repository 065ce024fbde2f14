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
