"""Imports per image: a burst of images that each need two more stores, at the default caps
(4 imports, 2 per store), counted in the Glance API nodes' own access logs; and the staging
reads that saves. Beside it, in the same run, the behaviour before one-import-per-image: send to the
stores that have room at once (`[ledger] split_imports_after = 0`).

Every copy-image import reads the whole image into Glance's staging area before writing
it to its stores, so each import beyond one per image reads the image again.
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    COPY_DEFAULTS,
    RUNS,
    Section,
    connect,
    get_sandbox,
    sandbox_mod,
    scale,
    spread,
)

from daemon import Daemon
from helpers import upload_image, wait_for

# images needing both stores
IMAGES = int(os.environ.get("IMAGESYNC_BENCH_BURST", str(scale(24, 3))))
ONE_STORE = IMAGES // 3   # images in the same burst needing slow only: uneven store counts
SIZE, TARGETS = 8 << 20, ["slow", "edge"]
MODES = {"one import per image": {}, "before (split at once)": {"split_imports_after": 0}}
_POST = re.compile(r"POST /v2/images/([0-9a-f-]{36})/import .*\(HTTP/1\.1 (\d{3})\)")


def log_ends(box) -> dict[str, int]:
    """Where each Glance API node's access log ends now."""
    return {node: box.node_log(node).stat().st_size for node in sandbox_mod.NODES}


def glance_imports(box, since: dict[str, int]) -> dict[str, list[int]]:
    """image id -> HTTP statuses of its copy-image POSTs, from the access logs of every
    Glance API node (HAProxy spreads the requests over them) after `since` (log_ends)."""
    out: dict[str, list[int]] = collections.defaultdict(list)
    for node, offset in since.items():
        with open(box.node_log(node), "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        for m in _POST.finditer(text):
            out[m.group(1)].append(int(m.group(2)))
    return out


def settled(conn, image_id: str) -> bool:
    props = conn.image.get_image(image_id).properties
    return not props.get("os_glance_import_task") and \
        set((props.get("stores") or "").split(",")) >= {"fast", *TARGETS}


def burst(box, conn, workdir: Path, options: dict) -> dict:
    prefix = f"ipi{uuid.uuid4().hex[:6]}"
    d = Daemon(box, workdir / prefix, f"""
version: 1
rules:
  - name: two-stores
    match: {{name: "{prefix}-two-*", tags: [go]}}
    stores: {TARGETS}
  - name: slow-only
    match: {{name: "{prefix}-one-*", tags: [go]}}
    stores: [slow]
""", {"imagesync": {"log_level": "INFO"}, "reconcile": {"interval": 0},
      "copy": COPY_DEFAULTS, "ledger": options})
    names = [f"{prefix}-one-{i:02}" for i in range(ONE_STORE)] + \
        [f"{prefix}-two-{i:02}" for i in range(IMAGES)]
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda name: upload_image(conn, SIZE, name=name), names))
    d.start()
    wait_for(lambda: any(e.get("event") == "reconcile pass done" for e in d.logs()),
             timeout=300, message="the start-up reconcile pass")
    since = log_ends(box)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:   # the burst: every image wanted at once
        list(pool.map(lambda i: conn.image.add_tag(i, "go"), images))
    wait_for(lambda: d.query("SELECT count(*) AS n FROM copies WHERE state = 'done'")[0]["n"]
             == IMAGES * len(TARGETS) + ONE_STORE, timeout=600, interval=0.2,
             message="every copy done in the ledger")
    seconds = time.perf_counter() - t0
    d.stop()
    assert all(settled(conn, i.id) for i in images[ONE_STORE:])
    posts = glance_imports(box, since)
    two = {i.id for i in images[ONE_STORE:]}
    accepted = sum(s.count(202) for i, s in posts.items() if i in two)
    sent = sum(len(s) for i, s in posts.items() if i in two)
    for image in images:
        conn.image.delete_image(image, ignore_missing=True)
    return {"accepted": accepted, "posts": sent, "seconds": seconds,
            "split": sum(1 for i in two if posts.get(i, []).count(202) > 1)}


def run() -> Section:
    box = get_sandbox()
    conn = connect(box)
    work = Path(tempfile.mkdtemp(prefix="bench-ipi-"))
    section = Section(
        "Imports per image", f"{IMAGES} images of {SIZE >> 20} MiB in `fast` wanted in "
        f"{' and '.join(TARGETS)}, and {ONE_STORE} wanted in slow only, all at once (tagging "
        "them starts the burst; the slow-only ones make the per-store counts uneven), default "
        "caps (4 imports, 2 per store); copy-image POSTs Glance accepted (202) for the "
        "two-store images, counted in the access logs of both Glance API nodes. Baseline: "
        "the same burst in the same run with `[ledger] split_imports_after = 0`, which sends "
        "an image to the stores with room at once, as imagesync did before "
        "(`python -m bench.bench_imports_per_image`).")
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(RUNS):
        for mode, options in MODES.items():
            results[mode].append(burst(box, conn, work, options))
            print(f"  {mode}: {results[mode][-1]}", flush=True)
    mine, before = results["one import per image"], results["before (split at once)"]
    per_image = [r["accepted"] / IMAGES for r in mine]
    per_image_before = [r["accepted"] / IMAGES for r in before]
    ratio = statistics.median(per_image) / statistics.median(per_image_before)
    section.row("imports per image", spread(per_image), spread(per_image_before),
                f"{ratio:.2f}x", "1.0")
    saved = [(b["accepted"] - m["accepted"]) * SIZE / (1 << 20)
             for m, b in zip(mine, before, strict=True)]
    section.row(f"staging reads saved per burst (MiB, {IMAGES} x {SIZE >> 20} MiB images)",
                spread(saved), "", "", "one image size per split avoided")
    section.row("images split over two imports", spread([r["split"] for r in mine]),
                spread([r["split"] for r in before]), "", "0")
    section.row("time until every copy is done (s)", spread([r["seconds"] for r in mine]),
                spread([r["seconds"] for r in before]))
    section.note("POSTs sent (all answers): " + "; ".join(
        f"{m['posts']} vs {b['posts']} before" for m, b in zip(mine, before, strict=True)))
    return section


if __name__ == "__main__":
    print(run().markdown())
