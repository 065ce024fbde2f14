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


# README commands that need files a clean clone does not have (real datasets, synthetic sets, several GPUs)
OUTSIDE_FILES = re.compile(r"--dataset (cityscapes|ade20k|coco)|torchrun")


def readme_commands(section: str) -> list[str]:
    """The commands of the first bash block under the README heading `section`, comments and `pip install` dropped."""
    text = (REPO / "README.md").read_text()
    body = re.split(rf"\n## {re.escape(section)}[^\n]*\n", text, maxsplit=1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    commands = []
    for line in block.splitlines():
        for part in line.split("#", 1)[0].split("&&"):
            part = " ".join(part.split())
            if part and not part.startswith("pip install"):
                commands.append(part)
    return commands


def test_every_cpu_command_of_the_readme_runs_in_ci():
    """A README command that no longer works must be a red CI: each one that needs no outside file starts a line of
    .ci/run (which may add flags that shorten it), and the test command is run there as `python -m pytest`."""
    ci = [" ".join(line.split()) for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = (readme_commands("Quick start") + readme_commands("Training and evaluation")
                + readme_commands("What makes synthetic data effective"))
    assert "python train.py" in commands and "pytest" in commands and any("quality.py label" in c for c in commands)
    missing = []
    for command in commands:
        if OUTSIDE_FILES.search(command):
            continue
        wanted = "python -m pytest" if command == "pytest" else command
        if not any(line == wanted or line.startswith(wanted + " ") for line in ci):
            missing.append(command)
    assert not missing, f"README commands that .ci/run never runs: {missing}"
    assert "python train.py --iters 20" in ci  # the first command itself, on the clean clone, before any other run


MEAN_STD = re.compile(r"(-?\d+\.\d+) ± (\d+\.\d+)")


def table_cells(text: str) -> set[str]:
    """Every "mean ± std" cell of the markdown tables in text."""
    cells = set()
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            cells |= {" ± ".join(match) for match in MEAN_STD.findall(line)}
    return cells


def test_numbers_quoted_from_the_toy_tables_are_in_the_tables():
    """A "mean ± std" written anywhere in the README or the docs (prose, or a table that copies rows) must be a cell
    of a table in docs/toy_study.md, where every table is eval.py's or quality.py's output: a number that drifted
    from its table fails here."""
    tables = table_cells((REPO / "docs" / "toy_study.md").read_text())
    assert tables, "docs/toy_study.md has no mean ± std table"
    stale = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.name == "toy_study.md" and line.lstrip().startswith("|"):
                continue  # its table rows are the source; a table elsewhere (the README's) quotes them
            stale += [f"{path.name}:{number}: {' ± '.join(m)}" for m in MEAN_STD.findall(line)
                      if " ± ".join(m) not in tables]
    assert not stale, stale
