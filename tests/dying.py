"""A measurement whose process dies without raising (as a segfault in a model's C++ code would): a task the
benchmarks' isolation must report as an error row. Its own module, so that a spawned child imports nothing else."""

import os


def die(*args: object) -> dict[str, object]:
    os._exit(3)
