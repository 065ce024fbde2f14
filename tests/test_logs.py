"""Logs redirected to a file hold lines, not progress-bar updates: every tqdm bar of the code turns itself off when its
stream is not a terminal (disable=None), and a command that draws one on a terminal writes no carriage return to a
file."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_progress_bar_turns_itself_off_off_a_terminal():
    calls = []
    for path in sorted(REPO.glob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"\btqdm\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            if not re.search(r"disable=[^,)]*\bNone\b", call):  # None: off where the stream is not a terminal
                calls.append(f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not calls, f"tqdm bars that draw into a redirected log: {calls}"


def test_a_redirected_command_writes_no_carriage_returns(tmp_path):
    """The toy world's writer draws a bar of ~1,000 updates on a terminal; into a file it writes none."""
    log = tmp_path / "log.txt"
    with log.open("wb") as out:
        subprocess.run([sys.executable, "data.py", "toy", "--root", str(tmp_path / "toy")], cwd=REPO, stdout=out,
                       stderr=subprocess.STDOUT, check=True, timeout=300)
    text = log.read_bytes()
    assert text and b"\r" not in text, text[:300]
