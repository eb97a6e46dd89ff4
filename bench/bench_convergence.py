"""Convergence: 40 images x 2 more stores. imagesync's wall time until every copy is done,
at its default caps and at 4/4, versus a hand-written script running copy-image with its
best concurrency (1, 2, 4 or 8 in flight), in the same run. Also Glance requests and polls per
copied (image, store), and the time from Glance dropping an import's lock (its own log:
"<task> of api_image_import completed", logged once the task is saved and the lock gone)
to imagesync logging "copy done".

Both go the same way: imagesync's Keystone user (clouds.yaml cloud `sandbox`), Glance's
endpoint from the catalogue, through HAProxy with TLS to the two Glance API nodes."""

from __future__ import annotations

import datetime
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import COPY_DEFAULTS, RUNS, Section, connect, get_sandbox, scale, spread

from daemon import Daemon
from helpers import upload_image, wait_for

IMAGES, SIZE, TARGETS = scale(40, 4), 8 << 20, ["slow", "edge"]
CAPS = {"default caps (4 in flight, 2 per store)": {},
        "caps 4/4": {"max_imports": 4, "max_imports_per_store": 4}}
_GOT = re.compile(r"^(\S+ \S+) .*Task (\S+): Got image data uri \S+/staging/([0-9a-f-]{36})")
_DONE = re.compile(r"^(\S+ \S+) .* (\S+) of api_image_import completed")


def lock_released(box, since: float) -> dict[str, float]:
    """image id -> when Glance logged its import task completed (lock dropped), from both
    API nodes' logs (oslo.log's local time), for tasks logged after `since`."""
    def at(text: str) -> float:
        return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()

    image_of, done = {}, {}
    for node in ("glance1", "glance2"):
        for line in (box.dir / "log" / f"{node}-api.log").read_text(errors="replace").splitlines():
            if m := _GOT.match(line):
                image_of[m[2]] = m[3]
            elif (m := _DONE.match(line)) and at(m[1]) >= since:
                done[m[2]] = at(m[1])
    return {image_of[t]: when for t, when in done.items() if t in image_of}


def upload_all(conn, prefix: str):
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: upload_image(conn, SIZE, name=f"{prefix}-{i:02}"),
                             range(IMAGES)))


def settled(conn, image_id: str, targets=TARGETS) -> bool:
    props = conn.image.get_image(image_id).properties
    return not props.get("os_glance_import_task") and \
        set((props.get("stores") or "").split(",")) >= {"fast", *targets}


def hand_script(conn, images, concurrency: int, targets=TARGETS) -> float:
    """What an operator would write: POST copy-image, poll every 0.1 s until done; with
    openstacksdk as imagesync's Keystone user, through HAProxy's TLS, as the daemon goes.
    The tag updates that start imagesync's clock are sent at the script's start too (the
    script ignores them): Glance serves the same user traffic in both runs."""
    def copy(image):
        resp = conn.image.post(f"/images/{image.id}/import", json={
            "method": {"name": "copy-image"}, "stores": targets,
            "all_stores_must_succeed": False}, raise_exc=False)
        assert resp.status_code == 202, resp.status_code
        while not settled(conn, image.id, targets):
            time.sleep(0.1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as users, ThreadPoolExecutor(concurrency) as pool:
        tagging = [users.submit(conn.image.add_tag, image, "go") for image in images]
        list(pool.map(copy, images))
        seconds = time.perf_counter() - t0
        for done in tagging:
            done.result()
    return seconds


def imagesync_run(box, conn, workdir: Path, caps: dict, targets=TARGETS) -> tuple[float, dict]:
    prefix = f"conv{uuid.uuid4().hex[:6]}"
    d = Daemon(box, workdir / prefix, f"""
version: 1
rules:
  - name: convergence
    match: {{name: "{prefix}-*", tags: [go]}}
    stores: {targets}
""", {"imagesync": {"log_level": "INFO"}, "copy": {**COPY_DEFAULTS, **caps},
      "reconcile": {"interval": 0}})
    images = upload_all(conn, prefix)  # before the daemon's queue exists: no events queued
    d.start()
    wait_for(lambda: any(e.get("event") == "reconcile pass done" for e in d.logs()),
             timeout=120, message="the start-up reconcile pass")
    t0, started = time.perf_counter(), time.time()
    with ThreadPoolExecutor(8) as pool:  # the trigger, as quick as the script's first POSTs
        list(pool.map(lambda i: conn.image.add_tag(i, "go"), images))
    wait_for(lambda: d.query("SELECT count(*) AS n FROM copies WHERE state = 'done'")[0]["n"]
             == IMAGES * len(targets), timeout=300, interval=0.05,
             message="every copy done in the ledger")
    seconds = time.perf_counter() - t0
    d.stop()
    stopped = [e for e in d.logs() if e.get("event") == "imagesync stopped"][-1]
    sent = sum(1 for e in d.logs() if e.get("event") == "copy-image sent")
    tasks = sum(1 for e in d.logs() if e.get("event") == "image held by another import")
    assert all(settled(conn, i.id, targets) for i in images)
    released = lock_released(box, started - 1)
    done = {}
    for e in d.logs():
        if e.get("event") == "copy done" and e.get("image_id") in released:
            ts = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
            done[e["image_id"]] = max(done.get(e["image_id"], 0.0), ts.timestamp())
    for image in images:
        conn.image.delete_image(image, ignore_missing=True)
    counts = {"visits": stopped["visits"], "polls": stopped["polls"], "posts": sent,
              "tasks": tasks, "noticed": [done[i] - released[i] for i in done]}
    return seconds, counts


def percentile(values, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values \
        else float("nan")


def run() -> Section:
    return measure(TARGETS, "Convergence", "(Glance's cost of the trigger, about 2 CPU-seconds, "
                   "falls on both). imagesync runs at its own defaults (`[copy] poll_interval` "
                   "2 s) (`python bench/bench_convergence.py`).")


def measure(targets: list[str], title: str, how: str) -> Section:
    """imagesync at CAPS against the hand script's best, copying IMAGES images to `targets`."""
    box = get_sandbox()
    conn = connect(box)
    work = Path(tempfile.mkdtemp(prefix="bench-conv-"))
    section = Section(title, f"{IMAGES} images of {SIZE >> 20} MiB in `fast` copied to "
                      f"{' and '.join(targets)}: imagesync at its default caps and at 4/4 "
                      "(tagging the images so the policy wants them starts the clock) versus "
                      "a hand script posting copy-image and polling every 0.1 s at 1, 2, 4 and 8 "
                      "in flight, best kept; both as imagesync's Keystone user through "
                      f"HAProxy's TLS, and both runs see the same {IMAGES} tag updates at their "
                      f"start {how}")
    mine: dict[str, list[float]] = {name: [] for name in CAPS}
    counts: dict[str, list[dict]] = {name: [] for name in CAPS}
    best, per_level = [], {1: [], 2: [], 4: [], 8: []}
    for _ in range(RUNS):
        for level in per_level:
            images = upload_all(conn, f"hand{uuid.uuid4().hex[:6]}")
            per_level[level].append(hand_script(conn, images, level, targets))
            for image in images:
                conn.image.delete_image(image, ignore_missing=True)
        best.append(min(per_level[level][-1] for level in per_level))
        for name, caps in CAPS.items():
            seconds, c = imagesync_run(box, conn, work, caps, targets)
            mine[name].append(seconds)
            counts[name].append(c)
    copies = IMAGES * len(targets)
    for name in CAPS:
        ratio = sorted(mine[name])[len(mine[name]) // 2] / sorted(best)[len(best) // 2]
        section.row(f"wall time, {copies} copies, {name} (s)", spread(mine[name]),
                    spread(best), f"{ratio:.2f}x",
                    f"1.0x or better: {'met' if ratio <= 1.0 else 'NOT met'}")
    for level, times in per_level.items():
        section.row(f"hand script, {level} in flight (s)", "", spread(times))
    for name in CAPS:
        cs = counts[name]
        per_copy = [(c["visits"] + c["posts"] + c["tasks"]) / copies for c in cs]
        polls = [c["polls"] / copies for c in cs]
        noticed = [x for c in cs for x in c["noticed"]]
        section.row(f"Glance requests per copy besides polling, {name}", spread(per_copy), "",
                    "", "3 or fewer")
        section.row(f"polls per copy, {name}", spread(polls), "", "",
                    f"0.5 or fewer: {'met' if max(polls) <= 0.5 else 'NOT met'}")
        section.row(f"lock dropped (Glance's log) -> `copy done`, p50 / p99 (ms), {name}",
                    f"{percentile(noticed, 50) * 1000:.0f} / "
                    f"{percentile(noticed, 99) * 1000:.0f} over {len(noticed)} imports")
        section.note(f"{name}, requests per run: " + "; ".join(
            f"{c['visits']} GETs to plan, {c['posts']} imports, {c['tasks']} task reads, "
            f"{c['polls']} polls" for c in cs))
    return section


if __name__ == "__main__":
    print(run().markdown())
