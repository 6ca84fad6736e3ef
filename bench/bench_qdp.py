"""Benchmark: how long `python qdp.py` (the whole method on the toy default) takes on this machine, stage by stage.

Runs qdp.py in a fresh temporary output folder as a user would (a separate process, the machine's default threads)
and times each stage from the moment its one-line summary appears. The target is 10 minutes on 2 CPU cores.

    python bench/bench_qdp.py                 # add qdp.py flags after --, e.g. -- --subject vase_heart
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "qdp.py"), "--out", out, *extra]
        t0 = last = time.time()
        rows = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT) as p:
            for line in p.stdout:
                if line.startswith("[") and "/5]" in line[:6] and not line.rstrip().endswith(" ..."):  # a stage's end
                    now = time.time()
                    rows.append((line.split(":")[0], now - last, line.strip()))
                    last = now
        if p.returncode:
            sys.exit(f"qdp.py failed (exit {p.returncode}): {' '.join(cmd)}")
    total = time.time() - t0
    print("| stage | seconds | summary |\n|---|---|---|")
    for stage, seconds, line in rows:
        print(f"| {stage} | {seconds:.0f} | {line.split(': ', 1)[1][:90]} |")
    print(f"| **total** | **{total:.0f}** ({total / 60:.1f} min, target 10 min) | |")


if __name__ == "__main__":
    main()
