"""The quick loop never reads the real data: every test that asks for ``shared_data`` is marked slow."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_tests_reading_the_real_data_are_deselected_by_not_slow() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "tests/test_data.py",
         "tests/test_train.py", "tests/test_benchmarks.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected, result.stdout[-2000:]
    readers = ("test_mnist_in_memory", "test_fashion_mnist_reads", "test_cifar10_partial", "test_truncated_idx_file",
               "test_corrupt_cifar_batch", "test_truncated_data_file", "test_mnist_default_config")  # fmt: skip
    assert not [test for test in collected if test.split("::")[1].startswith(readers)]
