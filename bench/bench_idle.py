"""Benchmark 6: what the idle daemon costs: PSS of its process tree, CPU and wake-ups.

Starts the real imagesync-daemon on the bench sandbox, waits for its first reconcile
pass, then measures consecutive idle windows beside a sleeping Python process started
for each window. Reads /proc only; py-spy, when installed, shows where the threads wait.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LISTENER, RUNS, Section, get_sandbox, scale, spread

# isort: split
# tests/ is on sys.path once bench.common is imported.
from daemon import Daemon
from helpers import wait_for

WINDOW = float(os.environ.get("IMAGESYNC_BENCH_IDLE_WINDOW", str(scale(30, 5))))
GOAL_PSS_MB = 150
GOAL_CPU_PERCENT = 0.5  # "near zero": at most half a percent of one core
TICK = os.sysconf("SC_CLK_TCK")

POLICY = """\
version: 1
rules:
  - name: idle-nothing-matches
    match:
      name: "bench-idle-no-such-image-*"
    stores: [slow]
"""


def _shipped(group: str, *names: str) -> dict:
    from imagesync import conf as conf_mod

    return {o.name: o.default for o in conf_mod.GROUPS[group] if o.name in names}


# The daemon with its shipped defaults, except the reconcile interval the brief names
# (tests/daemon.py tunes polling and logging for fast tests; undo that here).
OPTIONS = {
    "imagesync": _shipped("imagesync", "log_level"),
    "copy": _shipped("copy", "poll_interval", "backoff_base", "backoff_cap"),
    "reconcile": {"interval": 600},
    "notifications": LISTENER,  # the shipped listener defaults unless IMAGESYNC_BENCH_* say
}


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_figures(pid: int) -> dict[int, tuple[float, int]]:
    """tid -> (CPU seconds, context switches) for every thread of pid.

    Each context switch is a wake-up (or a preemption): a thread that polls shows many.
    """
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            n = sum(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                    if line.startswith(("voluntary_ctxt_switches",
                                        "nonvoluntary_ctxt_switches")))
        except OSError:
            continue
        out[int(task.name)] = ((int(fields[11]) + int(fields[12])) / TICK, n)
    return out


def snapshot(pids: list[int]) -> dict:
    per_thread = {}
    for pid in pids:
        per_thread.update(thread_figures(pid))
    return {"cpu": sum(cpu_seconds(p) for p in pids),
            "switches": sum(n for _, n in per_thread.values()),
            "pss": sum(pss_kib(p) for p in pids), "threads": len(per_thread),
            "per_thread": per_thread, "at": time.monotonic()}


def window(daemon_pids: list[int], seconds: float) -> tuple[dict, dict]:
    """One idle window: the daemon tree and a fresh sleeping interpreter, side by side."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(1.0)  # let it finish starting
        before = snapshot(daemon_pids), snapshot([sleeper.pid])
        time.sleep(seconds)
        after = snapshot(daemon_pids), snapshot([sleeper.pid])
    finally:
        sleeper.kill()
        sleeper.wait()
    out = []
    for b, a in zip(before, after, strict=True):
        elapsed = a["at"] - b["at"]
        per_thread = {tid: (100 * (cpu - b["per_thread"][tid][0]) / elapsed,
                            (n - b["per_thread"][tid][1]) / elapsed)
                      for tid, (cpu, n) in a["per_thread"].items() if tid in b["per_thread"]}
        out.append({"pss_mb": a["pss"] / 1024, "pss_start_mb": b["pss"] / 1024,
                    "cpu_percent": 100 * (a["cpu"] - b["cpu"]) / elapsed,
                    "wakeups": (a["switches"] - b["switches"]) / elapsed,
                    "threads": a["threads"], "per_thread": per_thread})
    return out[0], out[1]


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _py_spy() -> str | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return exe if Path(exe).exists() else None


def thread_names(pids: list[int]) -> dict[int, tuple[str, str]]:
    """tid -> (Python thread name, innermost frame), from py-spy dump; {} without py-spy."""
    exe, out = _py_spy(), {}
    if not exe:
        return out
    for pid in pids:
        done = subprocess.run([exe, "dump", "--pid", str(pid)], check=False,
                              capture_output=True, text=True, timeout=60)
        tid = None
        for line in done.stdout.splitlines():
            if line.startswith("Thread "):
                tid = int(line.split()[1], 0)
                out[tid] = (line.split('"', 1)[1].rstrip('"') if '"' in line else "?", "")
            elif tid is not None and line.startswith("    ") and line.strip():
                out[tid] = (out[tid][0], line.strip())
                tid = None
    return out


def hot_stacks(pids: list[int], seconds: int = 10, top: int = 3) -> list[tuple[int, str]]:
    """py-spy record (not pausing the daemon): the most sampled on-CPU stacks, innermost last."""
    exe = _py_spy()
    if not exe:
        return []
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pid in pids:
            raw = Path(tmp) / f"{pid}.txt"
            subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(seconds),
                            "--rate", "200", "--threads", "--nonblocking", "--format", "raw",
                            "-o", str(raw)], check=False, capture_output=True, timeout=120)
            if not raw.exists():
                continue
            for line in raw.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                frames = stack.split(";")
                key = frames[0] + ": " + " > ".join(f.split(" (")[0] for f in frames[-5:])
                counts[key] = counts.get(key, 0) + int(n)
    return sorted(((n, k) for k, n in counts.items()), reverse=True)[:top]


def col(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows]


def run() -> Section:
    section = Section(
        "Idle: the daemon with nothing to do",
        f"The real `imagesync-daemon` (oslo.service parent + worker) on the bench sandbox with a "
        f"one-rule policy no image matches, `[reconcile] interval = 600` and otherwise the "
        f"shipped defaults, measured after its first reconcile pass over everything the "
        f"sandbox's Glance holds. {RUNS} consecutive {WINDOW:.0f}-s windows; in each, "
        f"PSS summed over the process tree (`/proc/PID/smaps_rollup`, at the window's end), "
        f"CPU (utime + stime from `/proc/PID/stat`, as % of one core) and wake-ups "
        f"(context switches of all threads per second), beside a fresh "
        f"`python -c \"import time; time.sleep(600)\"` measured over the same window.")
    print(f"== {section.title}", flush=True)
    box = get_sandbox()
    with tempfile.TemporaryDirectory(prefix="imagesync-bench-idle-") as tmp:
        daemon = Daemon(box, Path(tmp), POLICY, OPTIONS)
        t0 = time.monotonic()
        daemon.start()
        try:
            started = time.monotonic() - t0
            done = wait_for(lambda: next((e for e in daemon.logs(since_start=True)
                                          if e.get("event") == "reconcile pass done"), None),
                            timeout=600, interval=0.5, message="the first reconcile pass")
            first_pass = time.monotonic() - t0
            print(f"  started in {started:.1f} s; first reconcile pass done after "
                  f"{first_pass:.1f} s: {done.get('images')} images, {done.get('pages')} pages, "
                  f"{done.get('marked')} marked", flush=True)
            time.sleep(2.0)
            pids = daemon.children()
            ours, base = [], []
            for i in range(RUNS):
                d, b = window(pids, WINDOW)
                ours.append(d)
                base.append(b)
                print(f"  window {i + 1}: daemon {d['pss_mb']:.1f} MB PSS, "
                      f"{d['cpu_percent']:.2f} % CPU, {d['wakeups']:.1f} wake-ups/s; sleeper "
                      f"{b['pss_mb']:.1f} MB, {b['cpu_percent']:.2f} %, "
                      f"{b['wakeups']:.1f}/s", flush=True)
            names = thread_names(pids)
            busy = statistics.median(col(ours, "cpu_percent")) > GOAL_CPU_PERCENT
            hot = hot_stacks(pids) if busy else []
            per_process = {p: (pss_kib(p) / 1024, threads(p),
                               Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                               .decode(errors="replace").strip()[:60]) for p in pids}
            if daemon.proc.poll() is not None:
                section.note(f"the daemon exited during the measurement:\n{daemon.tail()}")
        finally:
            daemon.stop()

    pss, cpu = col(ours, "pss_mb"), col(ours, "cpu_percent")
    section.row("PSS of the process tree (MB)", spread(pss),
                f"{spread(col(base, 'pss_mb'))} (sleeping python)",
                f"{statistics.median(pss) / statistics.median(col(base, 'pss_mb')):.1f}x",
                f"≤ {GOAL_PSS_MB} MB: {'met' if max(pss) <= GOAL_PSS_MB else 'NOT met'}")
    section.row("CPU (% of one core)", spread(cpu), spread(col(base, "cpu_percent")), "",
                f"near zero (≤ {GOAL_CPU_PERCENT} %): "
                f"{'met' if statistics.median(cpu) <= GOAL_CPU_PERCENT else 'NOT met'}")
    section.row("wake-ups (context switches per second, all threads)",
                spread(col(ours, "wakeups")), spread(col(base, "wakeups")))
    section.row("processes / threads", f"{len(pids)} / {ours[-1]['threads']}",
                f"1 / {base[-1]['threads']}")
    section.note("per process at the end: " + "; ".join(
        f"pid {p} `{cmd}` {mb:.1f} MB PSS, {n} threads"
        for p, (mb, n, cmd) in per_process.items()))
    section.note(f"daemon ready ('imagesync started') {started:.1f} s after launch; first "
                 f"reconcile pass done at {first_pass:.1f} s ({done.get('images')} images, "
                 f"{done.get('seconds')} s).")
    threads_note = []
    for tid, (cpu_pct, wakeups) in sorted(ours[-1]["per_thread"].items(),
                                          key=lambda kv: (-kv[1][0], -kv[1][1])):
        if cpu_pct <= 0 and wakeups < 0.5:
            continue
        name, frame = names.get(tid, ("?", ""))
        threads_note.append(f"`{name}` {cpu_pct:.2f} % CPU, {wakeups:.1f} wake-ups/s"
                            + (f" (idle in `{frame}`)" if frame else ""))
    section.note("threads that woke up in the last window: " + ("; ".join(threads_note)
                                                                  or "none"))
    listener = [w for tid, (_, w) in ours[-1]["per_thread"].items()
                if names.get(tid, ("",))[0].endswith("(_runner)")]
    if listener:
        from imagesync import conf as conf_mod

        timeout = float(OPTIONS["notifications"].get("batch_timeout") or next(
            o.default for o in conf_mod.notification_opts if o.name == "batch_timeout"))
        section.note(f"the notification listener thread wakes {listener[0]:.1f} times a second; "
                     f"1 / `[notifications] batch_timeout` ({timeout} s) = {1 / timeout:.0f}: "
                     f"oslo.messaging's batch listener polls RabbitMQ in batch_timeout slices "
                     f"while no message waits (`batch_poll_helper`, "
                     f"oslo_messaging/_drivers/base.py). The executor wakes once a second (its "
                     f"idle tick makes a few ledger calls, so the ledger writer wakes with it).")
    if hot:
        section.note("CPU above the goal; py-spy record (10 s, on-CPU samples), hottest "
                     "stacks: " + "; ".join(f"{n} samples: {k}" for n, k in hot))
    return section


if __name__ == "__main__":
    print(run().markdown())
