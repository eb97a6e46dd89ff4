"""Reaction: from an upload finishing to imagesync sending its copy-image request, versus
the floor: from the same upload finishing to image.activate reaching a raw kombu consumer.
Uploads come spaced out (the daemon idle between them: its listener in its long poll, its
executor asleep) and back to back (each right after the last, copies overlapping)."""

from __future__ import annotations

import datetime
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import kombu

from bench.bench_ingest import amqp, cleanup
from bench.common import LISTENER, RUNS, Section, connect, get_sandbox, scale, spread

from daemon import Daemon
from helpers import upload_image, wait_for

IMAGES = scale(50, 5)
GAP = 1.5    # seconds between spaced uploads: longer than the listener's idle poll (1 s)
UNBOUND = {"max_imports": 16, "max_imports_per_store": 16}   # caps that never bind here
# mode -> (seconds between uploads, [copy] caps, goal applies): back to back at the default
# caps (2 imports per store) measures queueing behind the caps as well, so it has no goal.
MODES = {"spaced out": (GAP, {}, True), "back to back": (0.0, UNBOUND, True),
         "back to back, default caps": (0.0, {}, False)}


class ActivateClock:
    """A raw kombu consumer on a queue of its own: when each image.activate arrived.
    `url`: imagesync's RabbitMQ user, as the daemon reads (so the queue is imagesync*)."""

    def __init__(self, url: str):
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()
        exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
        self.queue = kombu.Queue(f"imagesync-bench-floor-{uuid.uuid4().hex[:6]}", exchange,
                                 routing_key="notifications.info", durable=False,
                                 auto_delete=True)
        self.conn = kombu.Connection(amqp(url))
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(30)

    def _on(self, body, message) -> None:
        now = time.time()
        msg = json.loads(json.loads(body)["oslo.message"] if isinstance(body, str)
                         else body["oslo.message"])
        if msg.get("event_type") == "image.activate":
            self.arrived.setdefault(msg["payload"]["id"], now)
        message.ack()

    def _run(self) -> None:
        with self.conn.Consumer(self.queue, callbacks=[self._on],
                                accept=["json", "text/plain"]):
            self.ready.set()
            while not self.stop.is_set():
                try:
                    self.conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.release()


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def percentile(values, p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def one_run(box, conn, d: Daemon, gap: float) -> tuple[list[float], list[float]]:
    prefix = f"react{uuid.uuid4().hex[:6]}"
    d.policy_file.write_text(f"version: 1\nrules:\n  - name: r\n    match: {{name: '{prefix}-*'}}"
                             "\n    stores: [slow]\n")
    d.start()
    # Steady state: the start-up reconcile pass (10,000 images here) is over before uploads.
    wait_for(lambda: any(e.get("event") == "reconcile pass done"
                         for e in d.logs(since_start=True)), timeout=120,
             message="the start-up reconcile pass")
    clock = ActivateClock(box.transport_url)
    finished: dict[str, float] = {}
    images = []
    for i in range(IMAGES):
        began = time.monotonic()
        image = upload_image(conn, 64 * 1024, name=f"{prefix}-{i:02}")
        finished[image.id] = time.time()  # the upload's PUT has returned (and a GET after it)
        images.append(image)
        if gap:   # the workload: the next upload comes `gap` s after this one, copy done
            wait_for(lambda i=image: d.copies(i.id).get("slow") == "done", timeout=60,
                     interval=0.02, message="the copy, before the next upload")
            time.sleep(max(0.0, gap - (time.monotonic() - began)))
    wait_for(lambda: all(d.copies(i.id).get("slow") == "done" for i in images), timeout=120,
             interval=0.1, message="every copy done")
    wait_for(lambda: all(i.id in clock.arrived for i in images), timeout=30,
             message="every image.activate at the raw consumer")
    clock.close()
    d.stop()
    sent = {}
    for e in d.logs(since_start=True):
        if e.get("event") == "copy-image sent" and e.get("image_id") in finished:
            ts = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
            sent.setdefault(e["image_id"], ts.timestamp())
    for image in images:
        conn.image.delete_image(image, ignore_missing=True)
    mine = [sent[i] - finished[i] for i in finished]
    floor = [clock.arrived[i] - finished[i] for i in finished]
    return mine, floor


def run() -> Section:
    box = get_sandbox()
    conn = connect(box)
    section = Section("Reaction", f"{IMAGES} images uploaded per run, spaced out or back to "
                      "back; for each, the time from its upload returning to imagesync logging "
                      "`copy-image sent` "
                      "for it, versus the floor: from the same moment to `image.activate` "
                      "reaching a raw kombu consumer (`python bench/bench_reaction.py`). "
                      "Negative floors: Glance notifies before it answers the upload. "
                      "Measured in steady "
                      "state, after the daemon's start-up reconcile pass.")
    for mode, (gap, caps, goal) in MODES.items():
        d = Daemon(box, Path(tempfile.mkdtemp(prefix="bench-react-")), "version: 1\nrules: []\n",
                   {"imagesync": {"log_level": "INFO"}, "reconcile": {"interval": 0},
                    "notifications": LISTENER, "copy": caps})
        p50, p99, f50, f99 = [], [], [], []
        for _ in range(RUNS):
            mine, floor = one_run(box, conn, d, gap)
            p50.append(percentile(mine, 50) * 1000)
            p99.append(percentile(mine, 99) * 1000)
            f50.append(percentile(floor, 50) * 1000)
            f99.append(percentile(floor, 99) * 1000)
        cleanup(box.glance_transport_url, d.pool)
        d50 = sorted(a - b for a, b in zip(p50, f50, strict=True))[len(p50) // 2]
        d99 = sorted(a - b for a, b in zip(p99, f99, strict=True))[len(p99) // 2]
        section.row(f"p50 upload -> copy-image sent, {mode} (ms)", spread(p50), spread(f50),
                    f"+{d50:.0f} ms",
                    f"within 50 ms of the floor: {_met(d50 <= 50)}" if goal else "")
        section.row(f"p99 upload -> copy-image sent, {mode} (ms)", spread(p99), spread(f99),
                    f"+{d99:.0f} ms",
                    f"within 250 ms of the floor: {_met(d99 <= 250)}" if goal else "")
    section.note(f"spaced out: one upload every {GAP:g} s, after the last copy is done, at the "
                 "default caps; back to back: each upload right after the last, with caps "
                 f"that never bind here ({UNBOUND}), and at the default caps (2 imports per "
                 "store: the copies queue behind the caps, which is not reaction). The idle "
                 "figures (PSS, CPU, wake-ups) of the same daemon are in the Idle section of "
                 "the same run.")
    conf = d.conf_file.read_text()  # the listener's settings are the same in every mode
    section.note("listener settings: " + ", ".join(
        line.strip() for line in conf.splitlines()
        if line.startswith("batch")) + " (the daemon's defaults where "
        "not listed)")
    return section


if __name__ == "__main__":
    print(run().markdown())
