"""Wall time and peak RSS per export stage, for a command that prints cpuflow's stage lines.

    python bench/stage_profile.py --log /tmp/x.log -- cpuflow export --random-weights --arch sd15 OUT ...

Runs the command, samples the resident memory of its whole process tree (the command and
every descendant: the spawned quantization / validation children included) from /proc once
a second, and reads its stderr. The export prints ``[component] stage ...`` when a stage
begins and ``[component] stage ... 12.3 s`` when it ends (export/build.py ``_Steps``); each
stage gets the tree's peak RSS between the two lines. Prints one row per stage, the total
wall time and the overall peak, and writes the timestamped log (and, with --rss, the
one-second RSS series) for later reading. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
BEGIN = re.compile(r"^(\[[^\]]+\] .+?) \.\.\.$")
END = re.compile(r"^(\[[^\]]+\] .+?) \.\.\. ([0-9.]+) s$")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (shared pages counted per process)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            fields = stat[stat.rindex(")") + 2:].split()
            pid, ppid = int(name), int(fields[1])
            rss[pid] = int(fields[21]) * PAGE
            children.setdefault(ppid, []).append(pid)
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, help="timestamped copy of the command's stderr + stdout")
    ap.add_argument("--rss", default=None, help="one-second RSS series (seconds, GB), one a line")
    ap.add_argument("--json", default=None, help="the stage table as JSON")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lock = threading.Lock()
    state = {"peak": 0, "open": {}}
    series = []

    def sample() -> None:
        while proc.poll() is None:
            r = tree_rss(proc.pid)
            with lock:
                state["peak"] = max(state["peak"], r)
                for st in state["open"].values():
                    st["peak"] = max(st["peak"], r)
            series.append((round(time.time() - t0, 1), round(r / 1e9, 3)))
            time.sleep(a.interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rows = []
    with open(a.log, "w") as log:
        for line in proc.stdout:
            now = time.time() - t0
            text = line.rstrip("\n")
            log.write(f"{now:8.1f} {text}\n")
            log.flush()
            sys.stderr.write(line)
            m_end, m_begin = END.match(text), BEGIN.match(text)
            with lock:
                if m_end:
                    st = state["open"].pop(m_end.group(1), None)
                    peak = st["peak"] if st else 0
                    rows.append({"stage": m_end.group(1), "seconds": float(m_end.group(2)),
                                 "peak_rss_gb": round(peak / 1e9, 2), "ended_at_s": round(now, 1)})
                elif m_begin:
                    state["open"][m_begin.group(1)] = {"peak": tree_rss(proc.pid)}
    rc = proc.wait()
    th.join(timeout=5)
    wall = time.time() - t0
    if a.rss:
        with open(a.rss, "w") as f:
            f.writelines(f"{s} {g}\n" for s, g in series)
    print(f"\n{'stage':60s} {'wall s':>8s} {'peak RSS GB':>12s}", file=sys.stderr)
    for r in rows:
        print(f"{r['stage'][:60]:60s} {r['seconds']:8.1f} {r['peak_rss_gb']:12.2f}", file=sys.stderr)
    print(f"{'TOTAL (exit ' + str(rc) + ')':60s} {wall:8.1f} {state['peak'] / 1e9:12.2f}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cmd": cmd, "exit": rc, "wall_s": round(wall, 1),
                       "peak_rss_gb": round(state["peak"] / 1e9, 2), "stages": rows,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
