"""Where a whole command's seconds go: runs it, and prints each line of its output with the seconds
since the start, then the exit. Start-up is the time to the first line, writing the results the time
from the final line to the exit.

    python benchmarks/timeline.py cifarlab train --recipe fast75
    python benchmarks/timeline.py python -m cifarlab train --recipe fast94 --device cuda --data ...
"""
from __future__ import annotations

import subprocess
import sys
import time


def main() -> int:
    command = sys.argv[1:]
    if not command or command[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if command else 2
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
        print(f"{time.perf_counter() - started:7.2f}  {line.rstrip()}", flush=True)
    code = process.wait()
    print(f"{time.perf_counter() - started:7.2f}  exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
