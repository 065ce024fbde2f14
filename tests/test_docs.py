"""The repository's prose: every checkpoint path a command reads is one that a command writes, every relative link
resolves, and nothing points at files users do not have."""
import re
from pathlib import Path

import model
import train

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SOURCES = [*sorted(REPO.glob("*.py")), REPO / "docs" / "toy_study.sh"]
CHECKPOINT = re.compile(r"runs/([\w./-]+?)/(?:last|best)\.pt")


def written_run_folders(texts: list[str]) -> set[str]:
    """Run folders some command writes: train.py's default runs/<dataset>_<arch>_<method>, an explicit --out, and the
    toy study's runs/study/<study>/<group>_s<seed> (docs/toy_study.sh)."""
    folders = {f"{d}_{a}_{m}" for d in train.DATASET_PRESETS for a in model.ARCHS for m in train.METHODS}
    for text in texts:
        folders |= {match.rstrip("/") for match in re.findall(r"--out\s+runs/([\w./-]+)", text)}
    study = (REPO / "docs" / "toy_study.sh").read_text()
    for group in re.findall(r"\$S/(\w+/[\w.]+)_s\$s", study):
        folders |= {f"study/{group}_s{seed}" for seed in range(10)}
    return folders


def test_every_checkpoint_path_is_one_a_command_writes():
    texts = {path: path.read_text() for path in DOCS + SOURCES}
    written = written_run_folders(list(texts.values()))
    stale = [f"{path.relative_to(REPO)}: runs/{folder}" for path, text in texts.items()
             for folder in CHECKPOINT.findall(text) if folder not in written]
    assert not stale, stale
    assert "toy" not in written and "toy_dpt_sense" in written  # the class of error this catches: runs/toy/last.pt


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                if anchor not in {heading_anchor(h) for h in headings}:
                    broken.append(f"{path.name}: {target}")
    assert not broken, broken


def test_the_repository_stands_alone():
    for path in DOCS + SOURCES + sorted((REPO / "tests").glob("*.py")):
        text = path.read_text()
        assert "DESIGN" + ".md" not in text, path.name
