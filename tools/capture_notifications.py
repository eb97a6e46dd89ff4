#!/usr/bin/env python3
"""Capture the notifications a real Glance sends for an upload and copy-images, as fixtures.

    .tox/py3/bin/python tools/capture_notifications.py --dir SANDBOX \\
        --out tests/fixtures/glance-notifications-2024.1

Against a running sandbox (tools/sandbox.py up, any Glance release), through HAProxy with
openstacksdk as the sandbox's cloud "sandbox" (admin of project imagesync), one story:

1. upload an 8 MiB raw image (it lands in the default store, fast);
2. copy-image to slow and edge while edge cannot be written (its data directory made immutable
   with chattr +i: chmod stops no root process), all_stores_must_succeed=false: slow gets a
   copy, edge fails, the task succeeds;
3. copy-image to edge alone, still unwritable, all_stores_must_succeed=true: the task fails;
4. edge writable again, copy-image to edge: it succeeds;
5. delete the image.

Every notification Glance publishes meanwhile (exchange `glance`, every
`notifications.<priority>`, read by a queue of the script's own as Glance's RabbitMQ user) is
written to OUT as NNNN-<event_type>.json in the shape of tests/fixtures/glance-notifications/
(ctxt, event_type, metadata {message_id, timestamp}, payload, priority, publisher_id), with an
INDEX.txt of one line each. Each step's outcome is checked through the API (stores, failed
stores) and the script fails when it is not what Glance should make of it. Nothing is
scrubbed: Glance's notifications carry no credentials, and the script refuses to write any
that hold one of the sandbox's passwords or something token-like.

Needs root (chattr), kombu and openstacksdk (the test virtualenv has both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import kombu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sandbox as sandbox_mod  # noqa: E402

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")
IMAGE_BYTES = 8 * 1024 * 1024
TIMEOUT = 120.0           # seconds any one step may take
QUIET = 3.0               # after a task.failure: how long no further message must come


class CaptureError(RuntimeError):
    """A step did not end as it should; the message says what was seen."""


class Capture:
    """A queue of our own bound to Glance's exchange, and what it received, in order."""

    def __init__(self, url: str):
        self.conn = kombu.Connection(url.replace("rabbit://", "amqp://", 1))
        exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
        name = f"capture-{uuid.uuid4().hex[:8]}"
        self.queue = kombu.Queue(name, exchange, bindings=[
            kombu.binding(exchange, routing_key=f"notifications.{p}") for p in PRIORITIES],
            durable=False, auto_delete=True, exclusive=True)
        self.received: list[dict] = []
        self.consumer = self.conn.Consumer(self.queue, callbacks=[self._on_message],
                                           accept=["json"])
        self.consumer.consume()

    def _on_message(self, body, message) -> None:
        inner = json.loads(body["oslo.message"]) if isinstance(body, dict) else body
        self.received.append(inner)
        message.ack()

    def wait(self, what: str, done: Callable[[list[dict]], bool],
             timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [m.get("event_type") for m in self.received[-10:]]
                raise CaptureError(f"no {what} within {timeout:.0f}s; last events: {seen}")
            try:
                self.conn.drain_events(timeout=min(left, 1.0))
            except TimeoutError:
                pass

    def quiet(self, seconds: float = QUIET) -> None:
        """Take what arrives until nothing has for `seconds` (at most TIMEOUT in all)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise CaptureError(f"Glance never went quiet for {seconds:.0f}s")
            count = len(self.received)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    self.conn.drain_events(timeout=max(0.05, end - time.monotonic()))
                except TimeoutError:
                    pass
            if len(self.received) == count:
                return

    def close(self) -> None:
        self.consumer.cancel()
        self.conn.release()


def _task_events(received: list[dict], task_id: str) -> list[str]:
    return [m["event_type"] for m in received
            if m["event_type"].startswith("task.") and isinstance(m["payload"], dict)
            and m["payload"].get("id") == task_id]


def _new_task(received: list[dict], since: int) -> str | None:
    for m in received[since:]:
        if m["event_type"] == "task.create":
            return m["payload"]["id"]
    return None


def copy_image(conn, capture: Capture, image, stores: list[str],
               must_succeed: bool) -> tuple[str, str]:
    """POST a copy-image; wait for its task's end (task.run after a success, as Glance 33
    sends it last) and for the image's import lock to go. -> (task id, how it ended)."""
    since = len(capture.received)
    conn.image.import_image(image, method="copy-image", stores=stores,
                            all_stores_must_succeed=must_succeed)
    capture.wait("task.create", lambda r: _new_task(r, since) is not None)
    task = _new_task(capture.received, since)
    assert task is not None
    ends = ("task.success", "task.failure")
    capture.wait(f"end of task {task}",
                 lambda r: any(e in ends for e in _task_events(r, task)))
    ended = next(e for e in _task_events(capture.received, task) if e in ends)
    if ended == "task.success":
        capture.wait(f"task.run of {task}", lambda r: "task.run" in _task_events(r, task))
    deadline = time.monotonic() + TIMEOUT
    while get_image(conn, image.id).get("os_glance_import_task"):
        if time.monotonic() > deadline:
            raise CaptureError(f"image {image.id} still locked by an import after the task")
        time.sleep(0.2)
    capture.quiet()
    return task, ended


def get_image(conn, image_id: str) -> dict:
    """The image as Glance's API shows it (GET /v2/images/ID, through HAProxy)."""
    resp = conn.image.get(f"/images/{image_id}")
    resp.raise_for_status()
    return resp.json()


def expect(conn, image_id: str, stores: set[str], failed: set[str], step: str) -> None:
    image = get_image(conn, image_id)
    have = set(filter(None, image.get("stores", "").split(",")))
    fail = set(filter(None, image.get("os_glance_failed_import", "").split(",")))
    if (have, fail) != (stores, failed):
        raise CaptureError(f"after {step}: stores {sorted(have)}, failed {sorted(fail)}; "
                           f"expected {sorted(stores)}, failed {sorted(failed)}")
    print(f"[capture] {step}: stores {sorted(have)}, failed {sorted(fail)}", file=sys.stderr)


def story(box: sandbox_mod.Sandbox, conn, capture: Capture) -> list[str]:
    """The five steps of the module docstring; -> one line per step for the report."""
    edge = box.dir / "glance" / "stores" / "edge"
    name = f"capture-{box.glance_release}-{uuid.uuid4().hex[:6]}"
    data = (b"imagesync capture " * (IMAGE_BYTES // 18 + 1))[:IMAGE_BYTES]
    image = conn.image.create_image(name, data=data, disk_format="raw",
                                    container_format="bare", allow_duplicates=True,
                                    wait=True, timeout=TIMEOUT)
    capture.wait("image.activate", lambda r: any(
        m["event_type"] == "image.activate" and isinstance(m["payload"], dict)
        and m["payload"].get("id") == image.id for m in r))
    capture.quiet()
    expect(conn, image.id, {"fast"}, set(), "upload")
    steps = [f"upload {image.id}"]
    subprocess.run(["chattr", "+i", str(edge)], check=True)
    try:
        task, ended = copy_image(conn, capture, image, ["slow", "edge"], must_succeed=False)
        expect(conn, image.id, {"fast", "slow"}, {"edge"}, "copy to slow and edge (edge fails)")
        steps.append(f"copy to slow+edge, edge unwritable, must_succeed=false: {task} {ended}")
        task, ended = copy_image(conn, capture, image, ["edge"], must_succeed=True)
        expect(conn, image.id, {"fast", "slow"}, {"edge"}, "copy to edge (fails)")
        steps.append(f"copy to edge, edge unwritable, must_succeed=true: {task} {ended}")
    finally:
        subprocess.run(["chattr", "-i", str(edge)], check=True)
    task, ended = copy_image(conn, capture, image, ["edge"], must_succeed=True)
    expect(conn, image.id, {"fast", "slow", "edge"}, set(), "copy to edge")
    steps.append(f"copy to edge, writable: {task} {ended}")
    conn.image.delete_image(image.id)
    capture.wait("image.delete", lambda r: any(m["event_type"] == "image.delete" for m in r))
    capture.quiet()
    steps.append(f"delete {image.id}")
    return steps


def fixture(message: dict) -> dict:
    """One oslo.messaging v2 notification in the fixtures' shape. ctxt is what an
    oslo.messaging listener hands its endpoint (its amqp.unpack_context): the `_context_*`
    keys, and client_timeout from `_timeout`."""
    ctxt = {k[len("_context_"):]: v for k, v in message.items() if k.startswith("_context_")}
    ctxt["client_timeout"] = message.get("_timeout")
    return {
        "ctxt": ctxt,
        "event_type": message["event_type"],
        "metadata": {"message_id": message["message_id"], "timestamp": message["timestamp"]},
        "payload": message["payload"],
        "priority": message["priority"].lower(),
        "publisher_id": message["publisher_id"],
    }


def index_line(number: int, n: dict) -> str:
    """One INDEX.txt line, as tests/fixtures/glance-notifications/INDEX.txt has them."""
    head = f"{number:04d} {n['metadata']['timestamp'][11:23]} {n['priority']:<5} " \
           f"{n['event_type']:<16} "
    payload = n["payload"]
    if not isinstance(payload, dict):
        return head + f"payload(str)={str(payload)[:90]!r}"
    props = payload.get("properties")
    if not isinstance(props, dict):
        props = {}
    return head + (
        f"id={payload.get('id')} status={payload.get('status')} "
        f"backend={payload.get('backend')} "
        f"importing={payload.get('os_glance_importing_to_stores')} "
        f"failed={payload.get('os_glance_failed_import')} "
        f"props.importing={props.get('os_glance_importing_to_stores')!r} "
        f"props.failed={props.get('os_glance_failed_import')!r} "
        f"props.task={props.get('os_glance_import_task')}")


def secrets_in(box: sandbox_mod.Sandbox, text: str) -> list[str]:
    """Which of the sandbox's secrets, or token-like strings, `text` holds (names only)."""
    st = box.state
    known = {f"keystone password of {u}": p for u, p in st["keystone"]["passwords"].items()}
    known.update({f"rabbit password of {u}": p for u, p in st["rabbit"]["passwords"].items()})
    known.update({f"mariadb password of {u}": p for u, p in st["mariadb"]["passwords"].items()})
    known["redis password"] = st["redis"]["password"]
    found = [name for name, secret in known.items() if secret in text]
    # Fernet tokens start gAAAAA; a context would name them auth_token.
    found += [w for w in ("gAAAAA", "auth_token", "X-Auth-Token") if w in text]
    return found


def write(box: sandbox_mod.Sandbox, out: Path, received: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("[0-9][0-9][0-9][0-9]-*.json")):
        raise CaptureError(f"{out} already holds fixtures; remove them first")
    fixtures = [fixture(m) for m in received]
    text = json.dumps(fixtures)
    leaked = secrets_in(box, text)
    if leaked:
        raise CaptureError(f"the notifications hold secrets ({', '.join(leaked)}); "
                           "nothing written")
    lines = []
    for number, n in enumerate(fixtures, 1):
        (out / f"{number:04d}-{n['event_type']}.json").write_text(
            json.dumps(n, indent=2, sort_keys=True))
        lines.append(index_line(number, n))
    (out / "INDEX.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="a running sandbox's directory")
    parser.add_argument("--out", required=True, type=Path, help="where the fixtures go")
    args = parser.parse_args(argv)
    import openstack.config
    import openstack.connection

    box = sandbox_mod.Sandbox(args.dir)
    if not all(box.running().values()):
        print(f"capture: {args.dir} is not a running sandbox", file=sys.stderr)
        return 1
    region = openstack.config.OpenStackConfig(
        config_files=[str(box.clouds_yaml)], load_envvars=False).get_one(sandbox_mod.CLOUD)
    conn = openstack.connection.Connection(config=region)
    capture = Capture(box.glance_transport_url)
    try:
        steps = story(box, conn, capture)
    except CaptureError as exc:
        print(f"capture: {exc}", file=sys.stderr)
        return 1
    finally:
        capture.close()
    try:
        write(box, args.out, capture.received)
    except CaptureError as exc:
        print(f"capture: {exc}", file=sys.stderr)
        return 1
    print(f"Glance {box.glance_release}: {len(capture.received)} notifications in {args.out}")
    print("".join(f"  {s}\n" for s in steps), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
