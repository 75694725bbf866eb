"""Wall time and peak RSS per export stage, for a command that prints cpuflow's stage lines.

    python bench/stage_profile.py --log /tmp/x.log --rss /tmp/x.rss -- cpuflow export ... OUT ...
    python bench/stage_profile.py --from-files --log /tmp/x.log --rss /tmp/x.rss   # the table again

Runs the command, samples the resident memory of its whole process tree (the command and
every descendant: the spawned calibration / quantization / validation children included)
from /proc once a second, and reads its stderr. The export prints ``[component] stage ...
12.3 s`` when a stage ends (export/build.py ``_Steps``); each stage gets the tree's peak RSS
over the 12.3 s before that line. Prints one row per stage, the total wall time and the
overall peak, and writes the timestamped log and the one-second RSS series. Linux only.
RSS counts pages shared by several processes once per process (as the OOM killer's view
of a tree's memory roughly does), and memory-mapped weight files that are resident; the
second figure, anon, is the tree's anonymous memory only (``RssAnon`` of /proc/PID/status:
heap, packed weights, activations; not the file pages of mapped weights, which the kernel
can drop and re-read). The RSS series file has both: seconds, RSS GB, anon GB.
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
END = re.compile(r"^(\[[^\]]+\] .+?) \.\.\. ([0-9.]+) s$")


def _status_kb(pid: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) of ``root`` and all its descendants."""
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
    total = anon = 0
    todo = [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        if p in rss:
            anon += _status_kb(str(p), b"RssAnon:") * 1024
        todo += children.get(p, [])
    return total, anon


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    return tree_memory(root)[0]


def stage_rows(ends, series, interval: float = 1.0) -> list[dict]:
    """One row per ended stage ((name, seconds, time it ended)): its peak of the memory
    ``series`` ((seconds, RSS bytes[, anon bytes]) samples) over its interval, widened
    by one sample."""
    rows = []
    for name, seconds, ended in ends:
        lo, hi = ended - seconds - interval, ended + interval
        inside = [s for s in series if lo <= s[0] <= hi]
        row = {"stage": name, "seconds": seconds, "ended_at_s": round(ended, 1),
               "peak_rss_gb": round(max((s[1] for s in inside), default=0) / 1e9, 2)}
        if any(len(s) > 2 for s in series):
            row["peak_anon_gb"] = round(max((s[2] for s in inside if len(s) > 2), default=0) / 1e9, 2)
        rows.append(row)
    return rows


def from_files(log: str, rss: str) -> list[dict]:
    series = [(float(f[0]), *(float(g) * 1e9 for g in f[1:3])) for f in (ln.split() for ln in open(rss) if ln.strip())]
    ends = []
    for ln in open(log):
        t, _, text = ln.strip().partition(" ")
        m = END.match(text.strip())
        if m:
            ends.append((m.group(1), float(m.group(2)), float(t)))
    return stage_rows(ends, series)


def table(rows, wall=None, peak=None, rc=None, peak_anon=None) -> str:
    anon = any("peak_anon_gb" in r for r in rows)
    out = [f"{'stage':60s} {'wall s':>8s} {'peak RSS GB':>12s}" + (f" {'anon GB':>8s}" if anon else "")]
    out += [f"{r['stage'][:60]:60s} {r['seconds']:8.1f} {r['peak_rss_gb']:12.2f}"
            + (f" {r.get('peak_anon_gb', 0):8.2f}" if anon else "") for r in rows]
    if wall is not None:
        out.append(f"{'TOTAL (exit ' + str(rc) + ')':60s} {wall:8.1f} {peak / 1e9:12.2f}"
                   + (f" {peak_anon / 1e9:8.2f}" if anon and peak_anon is not None else ""))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, help="timestamped copy of the command's stderr + stdout")
    ap.add_argument("--rss", required=True, help="one-second RSS series (seconds, GB), one a line")
    ap.add_argument("--json", default=None, help="the stage table as JSON")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--from-files", action="store_true", help="only print the table of an earlier --log / --rss")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.from_files:
        print(table(from_files(a.log, a.rss)))
        return 0
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    state = {"peak": 0, "anon": 0}
    series: list[tuple[float, int, int]] = []

    def sample() -> None:
        while proc.poll() is None:
            r, anon = tree_memory(proc.pid)
            state["peak"] = max(state["peak"], r)
            state["anon"] = max(state["anon"], anon)
            series.append((time.time() - t0, r, anon))
            time.sleep(a.interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    ends = []
    with open(a.log, "w") as log:
        for line in proc.stdout:
            now = time.time() - t0
            text = line.rstrip("\n")
            log.write(f"{now:8.1f} {text}\n")
            log.flush()
            sys.stderr.write(line)
            m = END.match(text)
            if m:
                ends.append((m.group(1), float(m.group(2)), now))
    rc = proc.wait()
    th.join(timeout=5)
    wall = time.time() - t0
    with open(a.rss, "w") as f:
        f.writelines(f"{t:.1f} {r / 1e9:.3f} {anon / 1e9:.3f}\n" for t, r, anon in series)
    rows = stage_rows(ends, series, a.interval)
    print("\n" + table(rows, wall, state["peak"], rc, state["anon"]), file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cmd": cmd, "exit": rc, "wall_s": round(wall, 1),
                       "peak_rss_gb": round(state["peak"] / 1e9, 2),
                       "peak_anon_gb": round(state["anon"] / 1e9, 2), "stages": rows,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
