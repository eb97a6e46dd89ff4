"""A long copy: the Glance requests imagesync makes about one image while its import runs for
minutes, against a hand script polling it every 0.1 s, counted at the API nodes.

The sandbox's `slow` store is written at RATE MiB/s for the run (Sandbox.set_store_rate: a
slow array, modelled in Glance's own store driver), so a copy-image of SIZE MiB holds the
image's import lock for about SIZE / RATE seconds. imagesync (at its defaults) and the
script each copy an image of their own at the same time. The figure per 10 minutes adds to
what was counted the polls imagesync's schedule (imagesync.planner) makes in the rest of ten
minutes, and scales the script's count by time."""

from __future__ import annotations

import datetime
import tempfile
import threading
import time
import uuid
from pathlib import Path

from access_log import AccessLog

from bench.common import COPY_DEFAULTS, RUNS, Section, connect, get_sandbox, scale, spread
from imagesync import planner

from daemon import Daemon
from helpers import upload_image, wait_for

SIZE, RATE = scale(96, 8) << 20, 1.0     # bytes, MiB/s: a 96 s import
TEN_MINUTES = 600.0


def polls_after(seconds: float) -> int:
    """Polls imagesync's schedule (at the [copy] defaults) makes from `seconds` into an
    import until ten minutes."""
    settings = planner.Settings(poll_interval=COPY_DEFAULTS["poll_interval"])
    track, age, count = planner.Tracking(import_started_at=0.0), settings.poll_interval, 0
    while age <= TEN_MINUTES:
        count += age > seconds
        age += planner._poll_delay(track, age, settings)
    return count


def _ts(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _copied(conn, image_id: str) -> bool:
    props = conn.image.get_image(image_id).properties
    return "slow" in (props.get("stores") or "").split(",") and \
        not props.get("os_glance_import_task")


def hand_script(conn, image_id: str, out: dict) -> None:
    """POST copy-image to slow, then poll every 0.1 s until the copy shows."""
    t0 = time.monotonic()
    resp = conn.image.post(f"/images/{image_id}/import", json={
        "method": {"name": "copy-image"}, "stores": ["slow"]}, raise_exc=False)
    assert resp.status_code == 202, resp.status_code
    while not _copied(conn, image_id):
        time.sleep(0.1)
    out["seconds"] = time.monotonic() - t0


def one_run(box, conn, workdir: Path) -> dict:
    prefix = f"long{uuid.uuid4().hex[:6]}"
    mine = upload_image(conn, SIZE, name=f"{prefix}-mine")
    theirs = upload_image(conn, SIZE, name=f"{prefix}-script")
    d = Daemon(box, workdir / prefix, f"""
version: 1
rules:
  - name: long
    match: {{name: "{prefix}-mine"}}
    stores: [slow]
""", {"imagesync": {"log_level": "INFO"}, "copy": COPY_DEFAULTS, "reconcile": {"interval": 0}})
    log = AccessLog(box)
    script: dict = {}
    helper = threading.Thread(target=hand_script, args=(conn, theirs.id, script))
    d.start()                     # its start-up pass finds the image and copies it
    helper.start()
    wait_for(lambda: any(e.get("event") == "copy done" for e in d.logs()),
             timeout=SIZE / (RATE * (1 << 20)) * 3 + 60, interval=0.5,
             message="imagesync's long copy done")
    helper.join(timeout=SIZE / (RATE * (1 << 20)) * 3 + 60)
    d.stop()
    events = d.logs()
    sent = next(_ts(e) for e in events if e.get("event") == "copy-image sent")
    done = next(_ts(e) for e in events if e.get("event") == "copy done")
    stopped = [e for e in events if e.get("event") == "imagesync stopped"][-1]
    gets = log.requests("GET")
    counts = {image.id: sum(1 for _, path, _ in gets if path == f"/v2/images/{image.id}")
              for image in (mine, theirs)}
    for image in (mine, theirs):
        conn.image.delete_image(image, ignore_missing=True)
    return {"seconds": done - sent, "mine": counts[mine.id], "polls": stopped["polls"],
            "script": counts[theirs.id], "script_seconds": script["seconds"]}


def run() -> Section:
    box = get_sandbox()
    conn = connect(box)
    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    section = Section("A long copy", f"One image of {SIZE >> 20} MiB copied to `slow` written at "
                      f"{RATE:g} MiB/s (a slow array modelled in Glance's store driver: the "
                      "import holds the lock throughout); imagesync at its defaults and a hand "
                      "script polling every 0.1 s each copy an image of their own at the same "
                      "time; GETs of each image counted in the API nodes' access logs "
                      "(`python bench/bench_long_copy.py`).")
    box.set_store_rate("slow", RATE)
    try:
        runs = [one_run(box, conn, work) for _ in range(RUNS)]
    finally:
        box.set_store_rate("slow", None)
    ten = [r["mine"] + polls_after(r["seconds"]) for r in runs]
    script_ten = [r["script"] * TEN_MINUTES / r["script_seconds"] for r in runs]
    ratio = sorted(ten)[len(ten) // 2] / sorted(script_ten)[len(script_ten) // 2]
    section.row("import time, POST to `copy done` (s)", spread([r["seconds"] for r in runs]),
                spread([r["script_seconds"] for r in runs]))
    section.row("GETs of the image during its copy (API nodes)",
                spread([r["mine"] for r in runs]), spread([r["script"] for r in runs]))
    section.row("imagesync's own count of its polls", spread([r["polls"] for r in runs]))
    section.row("GETs over a 10-minute copy (counted + the schedule's rest)", spread(ten),
                spread(script_ten), f"{ratio:.3f}x",
                f"25 or fewer: {'met' if max(ten) <= 25 else 'NOT met'}")
    section.note("imagesync's GETs include the look that planned the copy before its POST and "
                 "the one that found it done (task.success); the script's are all polls.")
    return section


if __name__ == "__main__":
    print(run().markdown())
