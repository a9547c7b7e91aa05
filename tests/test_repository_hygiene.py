"""Repository hygiene: no tracked file names a folder of one machine (absolute paths under /work, /root or a
home folder) or tooling that is no part of the project (a borrowed GPU machine, its carry folder, its output
variable, its preparation script, the work that used them). A reader of the README, the docs, a script
or a generated report should find only what a clone of this repository has."""

from __future__ import annotations

import re
import subprocess

from helpers import REPO

# Built from pieces, so this file does not name what it looks for.
SLASH = "/"
FORBIDDEN = {
    "an absolute path of a machine's folders": re.compile(
        r"(?<![\w.~/-])" + SLASH + r"(?:work|root)" + SLASH + r"|(?<![\w.~/-])" + SLASH + "home" + SLASH + r"\w"
    ),
    "a borrowed machine": re.compile(r"\b" + "le" + r"nt\b", re.IGNORECASE),
    "the device carry folder": re.compile("dev" + "carry", re.IGNORECASE),
    "the device output variable": re.compile(r"\$" + r"\{?" + "OUT" + r"\b"),
    "the device preparation script": re.compile("shared" + SLASH + "device" + r"|\bprepare" + r"\.sh\b"),
    # "session" as pytest's and TensorBoard's word (scope="session", session_start_info, sessionGroups) is fine
    "a work session": re.compile(r"(?<![\w\"'])(?<!test )(?<!pytest )" + "sess" + r"ions?\b(?![\"'])"),
}
def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_names_a_machine_path_or_outside_tooling() -> None:
    found = []
    for name in tracked_text_files():
        path = REPO / name
        if not path.is_file():  # listed but deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (figures)
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    found.append(f"{name}:{number}: {what}: {line.strip()[:160]}")
    assert not found, "tracked files name what a clone does not have:\n" + "\n".join(found)


def test_the_patterns_catch_what_they_are_for() -> None:
    # The scan must be able to fail: each pattern on a line it is meant to catch, and not on ordinary prose.
    caught = {
        "an absolute path of a machine's folders": [f"data.root={SLASH}work{SLASH}shared/data",
                                                     f"cd {SLASH}root{SLASH}x", f"{SLASH}home{SLASH}alice/data"],
        "a borrowed machine": ["no GPU was le" + "nt to it"],
        "the device carry folder": ["bash .dev" + "carry/run.sh"],
        "the device output variable": ["--json $" + "OUT/gpu.json"],
        "the device preparation script": [f"bash ../shared{SLASH}device{SLASH}prepare" + ".sh"],
        "a work session": ["measured by the sess" + "ion that ran it"],
    }  # fmt: skip
    for what, lines in caught.items():
        assert all(FORBIDDEN[what].search(line) for line in lines), what
    ordinary = ["silently equivalent", "data/root/x", "../shared/data", "/var/tmp/pruneflow-slurm",
                'scope="session"', "one folder per test session", "SESSION_START_INFO_TAG", "session_groups",
                "OUTPUT", "cfg.data.root/"]  # fmt: skip
    for line in ordinary:
        assert not any(pattern.search(line) for pattern in FORBIDDEN.values()), line
