"""One line naming the machine a benchmark ran on: CPU model, cores, caches, load.

Absolute times differ between hosts of the same VM type (the development machine measured the
same fused meta-update at 0.161 s one day and 0.103 s the next, the eager reference moving by
the same factor), so every benchmark prints this line and docs/benchmarks.md records it.
"""

from __future__ import annotations

import os
import platform
import subprocess


def describe_machine() -> str:
    """CPU model, logical cores, L2/L3 sizes (from lscpu where present) and the load average."""
    fields: dict[str, str] = {}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lines.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    model = fields.get("Model name") or platform.processor() or "unknown CPU"
    caches = ", ".join(f"{key} {fields[key]}" for key in ("L2 cache", "L3 cache") if key in fields)
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} logical cores, {caches or 'caches unknown'}; load {load:.1f}"


if __name__ == "__main__":
    print(describe_machine())
