"""Screenshot a sweep's TensorBoard drift charts with headless Chromium (the README's picture).

    python scripts/screenshot_tensorboard.py outputs/sweeps/<time> docs/tensorboard_drift.png
    python scripts/screenshot_tensorboard.py <sweep> out.png --url-path '/?tagFilter=leak#timeseries'

Starts ``tensorboard --logdir <sweep>`` on a free port of 127.0.0.1, waits until it serves every run's
drift tags, points Chromium (``apt-get install chromium``) at it, saves the PNG and stops the server.
``serve_tensorboard`` is the same server for the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The Time Series dashboard filtered to the drift of the pruned kernels: one chart per tag, runs overlaid.
DEFAULT_URL_PATH = "/?darkMode=false&tagFilter=%5Edrift%2Fproducer_l2%24#timeseries"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)  # fmt: skip


def tensorboard_command() -> list[str] | None:
    """The ``tensorboard`` executable of this environment (or on PATH), else ``python -m tensorboard.main``;
    None where TensorBoard is not installed."""
    beside_python = Path(sys.executable).parent / "tensorboard"
    executable = str(beside_python) if beside_python.is_file() else shutil.which("tensorboard")
    if executable:
        return [executable]
    if importlib.util.find_spec("tensorboard") is not None:
        return [sys.executable, "-m", "tensorboard.main"]
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> Any:
    """GET ``url`` (POST ``body`` as JSON if given) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(url: str, ready: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    """Poll ``url`` until its JSON satisfies ``ready``; returns that JSON."""
    deadline = time.monotonic() + timeout
    answer: Any = None
    while time.monotonic() < deadline:
        try:
            answer = get_json(url)
            if ready(answer):
                return answer
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f} s; last answer: {str(answer)[:300]}")


def _answers(url: str) -> bool:
    try:
        get_json(url)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return False
    return True


@contextmanager
def serve_tensorboard(logdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """A TensorBoard server on ``logdir`` at a free port of 127.0.0.1; yields its base URL once it answers."""
    command = tensorboard_command()
    if command is None:
        raise FileNotFoundError("tensorboard is not installed: pip install tensorboard")
    port = free_port()
    with tempfile.TemporaryFile() as output:
        server = subprocess.Popen(
            [*command, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "2"],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        try:
            while not _answers(f"{url}/data/runs"):
                if server.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    problem = "exited" if server.poll() is not None else f"did not answer within {timeout:.0f} s"
                    raise RuntimeError(f"tensorboard {problem}: {output.read().decode()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def run_names(sweep: Path) -> set[str]:
    """The runs TensorBoard will list: folders under ``sweep`` holding event files, by relative path."""
    return {str(events.parent.relative_to(sweep)) for events in sweep.rglob("events.out.tfevents.*")}


def screenshot(url: str, out: Path, chromium: str, window: str = "1600,1000", budget_ms: int = 15000) -> None:
    """Save Chromium's rendering of ``url`` to ``out`` (a new empty profile, no network beyond the URL)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--url-path", default=DEFAULT_URL_PATH, help="dashboard path and query after the host")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--window", default="1600,1000", help="width,height in pixels")
    parser.add_argument("--budget-ms", type=int, default=15000, help="Chromium's virtual time to render")
    args = parser.parse_args()
    if not args.sweep.is_dir():
        raise SystemExit(f"screenshot: error: {args.sweep} is not a folder; pass a sweep folder")
    if not Path(args.chromium).is_file():
        raise SystemExit(f"screenshot: error: no Chromium at {args.chromium}; apt-get install chromium, or --chromium")
    expected = run_names(args.sweep)
    with serve_tensorboard(args.sweep) as url:
        wait_for(f"{url}/data/plugin/scalars/tags", lambda tags: expected <= set(tags))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(url + args.url_path, args.out, args.chromium, args.window, args.budget_ms)
    print(f"{args.out}: {len(expected)} runs of {args.sweep}")


if __name__ == "__main__":
    main()
