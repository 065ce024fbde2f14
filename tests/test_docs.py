"""The repository's prose: every checkpoint path a command reads is one that a command writes, every relative link
resolves, and nothing points at files users do not have."""
import re
from pathlib import Path

import eval as eval_module
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


# ---- One home for every number ------------------------------------------------------------------------------------
# A measured number has one home: a table a program printed and docs/toy_study.md or docs/benchmarks.md holds
# unchanged (eval.py --summarize, quality.py gate / truth, the log excerpts of train.py; bench.py's tables). Every
# other place that quotes a result (the README, the other pages, the prose of those two pages, comments, docstrings
# and help strings of the code) must quote a number of a home, or a difference of two numbers of one table column.

HOME_PAGES = ("toy_study.md", "benchmarks.md")
SUMMARY_FOOTER = re.compile(r"^\d+ runs? read in \d+ groups?\.")  # eval.py --summarize's line under its table
PRINTED_HEADERS = ("| class | pixels |", "| IoU of the labels vs the true layouts |")  # quality.py gate / truth
NUMBER = r"\d+(?:\.\d+)?"
RANGE = rf"(?P<a>{NUMBER})(?:\s*(?:–|-|to)\s*(?P<b>{NUMBER}))?"
# the paper's own numbers (main results, OT ablation, scale, its Section 3 protocol and its quality ladder), quoted
# beside the toy's
PAPER = {"61.81", "66.56", "68.17", "78.11", "78.98", "79.49", "79.80", "0.8", "10", "16", "80.65", "83.29", "84.88",
         "63.40", "64.96", "57.45", "59.09", "79.50", "62.74", "63.30", "49.62", "50.23", "81.27", "2.54", "1.59",
         "1.56", "1.64", "1.15", "0.56", "0.61", "1.47"}
ESTIMATE = re.compile(r"(?:~|≈|about|around|near|nearly|under|over|≥|≤|<|>|at least|at most)\s*$")
RESULT_WORDS = re.compile(r"mIoU|IoU|gat(?:e|ed|es)\b|right\b|accura|acc_|ahead|behind|gains?\b|loses?\b|"
                          r"\blead|beat|reach|faster|slower|cheaper|took|passe[sd]", re.I)
QUOTED = {
    # "88.61 mIoU", "2.0–2.7 mIoU", "7 mIoU"
    "mIoU": re.compile(rf"(?<![\w.]){RANGE}\s*(?:mIoU|IoU)\b"),
    # "mIoU 88.61", "EMA teacher mIoU 82.33", "an IoU of 11–28"
    "mIoU after": re.compile(rf"\b(?:mIoU|IoU)(?: of)?\s+{RANGE}(?![\w.%×x/])"),
    # "38-66 %" where the sentence speaks of a result (a gate's share, labels right, an accuracy)
    "%": re.compile(rf"(?<![\w.]){RANGE}\s*%"),
    # "+2.0", "−0.3 from 3600 to 7200" (a gain or a loss)
    "gain": re.compile(rf"(?<![\w.)\]}}])(?P<sign>[+−])(?P<a>\d+\.\d+)(?![\w.×/]|\s*[×x]\b)"),
    # "4 min 38 s", "453 s", "6.4 min"
    "time": re.compile(r"(?<![\w.])(?P<a>\d+ min \d+ s|\d{3,} s\b|\d+\.\d+ min\b)"),
}


def numbers(text: str) -> list[str]:
    """The numbers of a text as written (their decimals matter)."""
    return re.findall(NUMBER, text)


def split_blocks(text: str) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """Markdown tables (each followed by the line after it), fenced blocks (language tag first), prose lines."""
    tables, fenced, prose = [], [], []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("```")), len(lines))
            fenced.append([lines[i][3:].strip(), *lines[i + 1:j]])
            i = j + 1
        elif lines[i].lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            after = next((line for line in lines[j:] if line.strip()), "")
            tables.append([*lines[i:j], after])
            i = j
        else:
            prose.append(lines[i])
            i += 1
    return tables, fenced, prose


def printed(table: list[str], page: str) -> bool:
    """Whether a table is a program's output pasted unchanged (every table of benchmarks.md is bench.py's)."""
    return page == "benchmarks.md" or table[0].startswith(PRINTED_HEADERS) or bool(SUMMARY_FOOTER.match(table[-1]))


SHARE_COLUMNS = set(eval_module.SUMMARY_KEYS)  # shares in [0, 1], quoted as percentages too


def home_numbers() -> dict[str, list[tuple[float, int]]]:
    """The numbers of the home pages' printed tables and output, as (value, decimals, decimals a quote may drop), by kind: "miou" (mIoU and
    IoU cells in %, and docs/toy_study.md's per-seed finals, two decimals as eval.py prints them), "%" (also the
    gate's shares, the log excerpts' percentages, the key columns' shares × 100), "difference" (of two cells of one
    mIoU / % column of one table), "time" (seconds, of the tables' "N min N s" cells) and "bench" (bench.py's)."""
    homes = {kind: [] for kind in ("miou", "%", "difference", "time", "bench")}

    def add(kind, text, scale=1):
        for n in numbers(text):
            decimals = len(n.partition(".")[2])
            homes[kind].append((float(n) * scale, max(0, decimals - (2 if scale == 100 else 0))))

    for page in HOME_PAGES:
        tables, fenced, prose = split_blocks((REPO / "docs" / page).read_text())
        for table in tables:
            if not printed(table, page):
                continue
            rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table[:-1]]
            body = [row for row in rows[2:] if len(row) == len(rows[0])]
            for header, *column in zip(rows[0], *body):
                means = [cell.split("±")[0].replace("−", "-") for cell in column]  # means, not stds
                if page == "benchmarks.md":
                    for cell in means:
                        add("bench", cell)
                        add("%" if "%" in cell else "bench", cell if "%" in cell else "")
                        for time in re.findall(r"\d+ min \d+ s", cell):
                            homes["time"].append((time_seconds(time), 0))
                    continue
                if header in SHARE_COLUMNS:
                    for cell in means:
                        add("%", cell, scale=100)
                    continue
                kind = "%" if header.startswith(("gated (%", "right (%")) else "miou" if header not in (
                    "run", "seeds", "class", "pixels", "gated pixels labelled as it") else None
                if kind is None or not column or column[0].startswith(("sky", "mIoU")) and header == rows[0][0]:
                    continue
                for cell in means:
                    add(kind, cell)
                if SUMMARY_FOOTER.match(table[-1]):  # eval.py's mIoU, things and class columns
                    cells = [(float(n[0]), len(n[0].partition(".")[2])) for n in map(numbers, means) if n]
                    homes["difference"] += [(abs(a - b), d) for a, d in cells for b, _ in cells if a != b]
        for block in fenced:
            if block[0] not in ("bash", "python"):  # printed output, not commands
                for line in block[1:]:
                    add("%", " ".join(re.findall(rf"{NUMBER}(?=%)", line)))
        if page == "toy_study.md":  # the exploratory record (How the toy world got here): its percentages as written
            for table in tables:
                if not printed(table, page):
                    add("%", " ".join(re.findall(rf"{NUMBER}(?=\s*%)", " ".join(table))))
                    add("%", " ".join(cell for row in table[2:-1] for cell in row.split("|")[5:]))
            add("miou", " ".join(n for line in prose for n in re.findall(r"(?<![\d.])\d+\.\d\d(?!\d)", line)))
    # a percentage is quoted as printed (rounding one of hundreds of shares to a whole percent would match nearly any
    # number); an mIoU or IoU may lose one decimal: 2.0 for a difference of 2.02
    homes = {kind: [(v, d, 1 if kind in ("miou", "difference") else 0) for v, d in values]
             for kind, values in homes.items()}
    homes["%"] += homes["miou"]
    return homes


def matches(quoted: str, homes: list[tuple[float, int, int]]) -> bool:
    """quoted (as written) is a home number (value, decimals, decimals it may lose) rounded to quoted's decimals."""
    q, decimals = float(quoted), len(quoted.partition(".")[2])
    half = 0.5 * 10 ** -decimals + 1e-9
    return any(0 <= d - decimals <= drop and abs(v - q) <= half for v, d, drop in homes)


def time_seconds(text: str) -> float:
    minutes = re.match(r"(\d+) min (\d+) s", text)
    if minutes:
        return 60 * int(minutes[1]) + int(minutes[2])
    return float(text.split()[0]) * (60 if text.endswith("min") else 1)


def code_text(path: Path) -> str:
    """The prose of a source file: its comments and string literals (docstrings, help strings, messages)."""
    import io
    import tokenize
    if path.suffix != ".py":
        return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
    pieces, last = [], 0
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type in (tokenize.COMMENT, tokenize.STRING):
            pieces += [""] * (token.start[0] > last + 1) + [token.string.lstrip("#")]  # a gap ends a paragraph
            last = token.end[0]
    return "\n".join(pieces)


def paragraphs(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of each paragraph, table row or comment block of a page or source file; the home pages'
    printed tables and output left out (they are the numbers' home)."""
    if path.suffix != ".md":
        text = code_text(path)
    else:
        text = path.read_text()
        if path.name in HOME_PAGES:
            tables, fenced, prose = split_blocks(text)
            kept = [row for table in tables if not printed(table, path.name) for row in table[:-1]]
            kept += [line for block in fenced if block[0] in ("bash", "python") for line in block[1:]]
            text = "\n".join(prose + [""] + kept)
    units, start, lines = [], 0, text.splitlines()
    for number, line in enumerate(lines + [""], 1):
        if line.lstrip().startswith("|"):
            units.append((number, line))
        elif not line.strip() and number - 1 > start:
            units.append((start + 1, " ".join(lines[start:number - 1])))
        if not line.strip() or line.lstrip().startswith("|"):
            start = number
    return units


def quoted_results(text: str):
    """(kind, number as written) of each result the text quotes: estimates (~, about, under), criteria (≥, at
    least) and the paper's numbers left out; a percentage only where the sentence speaks of a result."""
    for kind, pattern in QUOTED.items():
        for match in pattern.finditer(text):
            if ESTIMATE.search(text[max(0, match.start() - 12):match.start()]):
                continue
            if kind == "%" and not RESULT_WORDS.search(text[max(0, match.start() - 100):match.end() + 60]):
                continue
            for group in ("a", "b"):
                number = match.groupdict().get(group)
                if number and number not in PAPER and number != "0":  # "counts as IoU 0": a convention
                    yield kind, number


POOLS = {"mIoU": ("miou", "difference"), "mIoU after": ("miou",), "%": ("%",),
         "gain": ("difference",), "time": ("time",)}  # the homes each kind of quote may come from


def stale_numbers(paths: list[Path]) -> list[str]:
    """Each quoted result of paths without a home, as "file (paragraph at line N): kind number". The home pages'
    own prose is held to their tables for mIoU, gains and times; its percentages read the runs' logs and gate
    reports beside the tables and are not checked. A paragraph that names the test which measures its numbers
    (tests/test_*.py) has its home there."""
    homes = home_numbers()
    stale = []
    for path in paths:
        for line, text in paragraphs(path):
            if "tests/test_" in text:
                continue
            for kind, number in quoted_results(text):
                if kind == "%" and path.name in HOME_PAGES:
                    continue
                if kind == "time":
                    ok = any(abs(s - time_seconds(number)) < 1e-6 for s, _, _ in homes["time"])
                else:
                    ok = matches(number, [h for pool in POOLS[kind] for h in homes[pool]])
                if not ok:
                    stale.append(f"{path.relative_to(REPO)} (paragraph at line {line}): {kind} {number}")
    return stale


def test_every_quoted_result_has_a_home():
    """A result (an mIoU, a share in %, a gain "+2.0", a time "4 min 38 s") quoted in the README, the pages, the prose
    of the home pages or the code's comments, docstrings and help strings is a number of a printed table (rounding
    to fewer digits allowed; a gain or an mIoU difference may be the difference of two cells of one column)."""
    homes = home_numbers()
    assert len(homes["miou"]) > 200 and homes["bench"], "the home pages' printed tables were not found"
    stale = stale_numbers(DOCS + SOURCES)
    assert not stale, "numbers without a home in a printed table:\n" + "\n".join(stale)


def summary_tables() -> list[tuple[list[str], str]]:
    """(header cells, footer line) of each eval.py --summarize table in docs/toy_study.md."""
    tables = split_blocks((REPO / "docs" / "toy_study.md").read_text())[0]
    return [([cell.strip() for cell in table[0].strip().strip("|").split("|")], table[-1])
            for table in tables if SUMMARY_FOOTER.match(table[-1])]


def test_the_study_tables_have_the_columns_summarize_prints():
    """A table pasted unchanged has every training-log column eval.py --summarize prints for runs that logged them
    (a toy run with synthetic images logs all of SUMMARY_KEYS; a supervised-only table has none), in its order, and
    the footer line under it names the same columns."""
    keys = list(eval_module.SUMMARY_KEYS)
    allowed = ([], keys, ["image_ratio", *keys])  # Mask2Former's tables add its image gate (--keys image_ratio ...)
    tables = summary_tables()
    assert tables, "docs/toy_study.md has no eval.py --summarize table"
    wrong = []
    for header, footer in tables:
        columns = [cell for cell in header if cell in keys or cell == "image_ratio"]
        named = footer.split(": mean over each run's")[0].rsplit("%; ", 1)[-1]
        if columns not in allowed or named != (", ".join(columns) or "key columns"):
            wrong.append(f"{header[:3]}...: key columns {columns}, footer names '{named}'")
    assert not wrong, wrong


def test_help_strings_give_the_toy_presets():
    """A help string that names the toy world's value of a flag ("toy: 300", "toy 0.98") names the preset's."""
    import argparse
    from unittest import mock
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, argv=None: self):
        parser = train.parse_args([])
    presets = {**train.TOY_OPTIM, **train.TOY_SCHEDULE}
    wrong = []
    for action in parser._actions:
        key = action.dest
        found = re.search(r"\btoy:? ([\d.e-]+\d)", action.help or "")
        if found and key in presets and float(found[1]) != float(presets[key]):
            wrong.append(f"--{key.replace('_', '-')}: help says toy {found[1]}, the preset is {presets[key]}")
    assert not wrong, wrong


def test_counts_of_the_default_synthetic_set():
    """"N dense-fine images" names the toy world's synthetic.txt: TOY_SYNTHETIC_PER_REAL × the labelled images."""
    import data
    count = data.TOY_LABELLED * data.TOY_SYNTHETIC_PER_REAL
    wrong = [f"{path.relative_to(REPO)}: {n}" for path in DOCS + SOURCES
             for n in re.findall(r"(\d+) dense-fine (?:synthetic )?images", path.read_text().replace("\n", " "))
             if int(n) != count]
    assert not wrong, f"synthetic.txt holds {count} dense-fine images: {wrong}"


def test_the_verdict_on_sense_is_the_methods_table():
    """"SENSE is ahead / level / behind" agrees with the methods table (docs/toy_study.md's first summary table):
    level when the means differ by no more than the larger standard deviation."""
    table = split_blocks((REPO / "docs" / "toy_study.md").read_text())[0]
    rows = {row.split("|")[1].strip(): row for row in next(t for t in table if SUMMARY_FOOTER.match(t[-1]))[:-1]}
    (sense, sense_std), (base, base_std) = [map(float, re.search(MEAN_STD, rows[name].split("|")[3]).groups())
                                            for name in ("sense", "supervised_B")]
    verdict = ("level" if abs(sense - base) <= max(sense_std, base_std) else
               "ahead" if sense > base else "behind")
    same = {"level": {"level"}, "ahead": {"ahead", "above"}, "behind": {"behind", "below"}}[verdict]
    wrong = [f"{path.relative_to(REPO)}: SENSE {word} (the table: {verdict})" for path in DOCS + SOURCES
             for word in re.findall(r"SENSE (?:is|stays) (behind|level|ahead|above|below)\b",
                                    path.read_text().replace("\n", " "))
             if word not in same]
    assert not wrong, wrong
