"""Convergence: 40 images x 2 more stores. imagesync's wall time until every copy is done,
versus a hand-written script running copy-image with its best concurrency (1, 4 or 8
in flight), in the same run. Also Glance requests per copied (image, store).

Both go the same way: imagesync's Keystone user (clouds.yaml cloud `sandbox`), Glance's
endpoint from the catalogue, through HAProxy with TLS to the two Glance API nodes."""

from __future__ import annotations

import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RUNS, Section, connect, get_sandbox, scale, spread

from daemon import Daemon
from helpers import upload_image, wait_for

IMAGES, SIZE, TARGETS = scale(40, 4), 8 << 20, ["slow", "edge"]
CAPS = {"max_imports": 4, "max_imports_per_store": 4}


def upload_all(conn, prefix: str):
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: upload_image(conn, SIZE, name=f"{prefix}-{i:02}"),
                             range(IMAGES)))


def settled(conn, image_id: str) -> bool:
    props = conn.image.get_image(image_id).properties
    return not props.get("os_glance_import_task") and \
        set((props.get("stores") or "").split(",")) >= {"fast", *TARGETS}


def hand_script(conn, images, concurrency: int) -> float:
    """What an operator would write: POST copy-image, poll every 0.1 s until done; with
    openstacksdk as imagesync's Keystone user, through HAProxy's TLS, as the daemon goes."""
    def copy(image):
        resp = conn.image.post(f"/images/{image.id}/import", json={
            "method": {"name": "copy-image"}, "stores": TARGETS,
            "all_stores_must_succeed": False}, raise_exc=False)
        assert resp.status_code == 202, resp.status_code
        while not settled(conn, image.id):
            time.sleep(0.1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(copy, images))
    return time.perf_counter() - t0


def imagesync_run(box, conn, workdir: Path) -> tuple[float, dict]:
    prefix = f"conv{uuid.uuid4().hex[:6]}"
    d = Daemon(box, workdir / prefix, f"""
version: 1
rules:
  - name: convergence
    match: {{name: "{prefix}-*", tags: [go]}}
    stores: {TARGETS}
""", {"imagesync": {"log_level": "INFO"}, "copy": CAPS, "reconcile": {"interval": 0}})
    images = upload_all(conn, prefix)  # before the daemon's queue exists: no events queued
    d.start()
    wait_for(lambda: any(e.get("event") == "reconcile pass done" for e in d.logs()),
             timeout=120, message="the start-up reconcile pass")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:  # the trigger, as quick as the script's first POSTs
        list(pool.map(lambda i: conn.image.add_tag(i, "go"), images))
    wait_for(lambda: d.query("SELECT count(*) AS n FROM copies WHERE state = 'done'")[0]["n"]
             == IMAGES * len(TARGETS), timeout=300, interval=0.05,
             message="every copy done in the ledger")
    seconds = time.perf_counter() - t0
    d.stop()
    stopped = [e for e in d.logs() if e.get("event") == "imagesync stopped"][-1]
    sent = sum(1 for e in d.logs() if e.get("event") == "copy-image sent")
    tasks = sum(1 for e in d.logs() if e.get("event") == "image held by another import")
    assert all(settled(conn, i.id) for i in images)
    for image in images:
        conn.image.delete_image(image, ignore_missing=True)
    counts = {"visits": stopped["visits"], "polls": stopped["polls"], "posts": sent,
              "tasks": tasks}
    return seconds, counts


def run() -> Section:
    box = get_sandbox()
    conn = connect(box)
    work = Path(tempfile.mkdtemp(prefix="bench-conv-"))
    section = Section("Convergence", f"{IMAGES} images of {SIZE >> 20} MiB in `fast` copied to "
                      f"{' and '.join(TARGETS)}: imagesync (caps {CAPS}, tagging the images "
                      "so the policy wants them starts the clock) versus a hand script posting "
                      "copy-image and polling every 0.1 s at 1, 4 and 8 in flight, best kept; "
                      "both as imagesync's Keystone user through HAProxy's TLS "
                      "(`python bench/bench_convergence.py`).")
    mine, best, per_level = [], [], {1: [], 4: [], 8: []}
    requests = []
    for _ in range(RUNS):
        for level in per_level:
            images = upload_all(conn, f"hand{uuid.uuid4().hex[:6]}")
            per_level[level].append(hand_script(conn, images, level))
            for image in images:
                conn.image.delete_image(image, ignore_missing=True)
        best.append(min(per_level[level][-1] for level in per_level))
        seconds, counts = imagesync_run(box, conn, work)
        mine.append(seconds)
        requests.append(counts)
    ratio = sorted(mine)[len(mine) // 2] / sorted(best)[len(best) // 2]
    section.row(f"wall time, {IMAGES * len(TARGETS)} copies (s)", spread(mine), spread(best),
                f"{ratio:.2f}x", "1.1x or better")
    for level, times in per_level.items():
        section.row(f"hand script, {level} in flight (s)", "", spread(times))
    per_copy = [(c["visits"] + c["posts"] + c["tasks"]) / (IMAGES * len(TARGETS))
                for c in requests]
    polls = [c["polls"] / (IMAGES * len(TARGETS)) for c in requests]
    section.row("Glance requests per copy, besides polling", spread(per_copy), "", "",
                "3 or fewer")
    section.row("polls per copy", spread(polls))
    section.note("requests per run: " + "; ".join(
        f"{c['visits']} GETs to plan, {c['posts']} imports, {c['tasks']} task reads, "
        f"{c['polls']} polls" for c in requests))
    return section


if __name__ == "__main__":
    print(run().markdown())
