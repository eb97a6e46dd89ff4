"""The sandbox is real: Glance copies between stores, enforces its policy, and notifies."""

from __future__ import annotations

import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import import_settled, stores_of, upload_image, wait_for


def copy_image(conn, image, stores):
    return conn.image.import_image(image, method="copy-image", stores=list(stores),
                                   all_stores_must_succeed=False)


def test_an_image_uploaded_to_fast_is_copied_to_slow_and_edge(admin_conn):
    image = upload_image(admin_conn, 1 << 20, store="fast")
    assert stores_of(admin_conn, image.id) == {"fast"}

    resp = copy_image(admin_conn, image, ["slow", "edge"])

    assert resp.status_code == 202, resp.text
    wait_for(lambda: import_settled(admin_conn, image.id) and
             stores_of(admin_conn, image.id) == {"fast", "slow", "edge"},
             timeout=60, message="the copy to slow and edge")
    assert admin_conn.image.get_image(image.id).properties["stores"] == "fast,slow,edge"


def test_eight_images_copied_four_at_a_time_all_complete_and_release_their_locks(admin_conn):
    images = [upload_image(admin_conn, 512 * 1024) for _ in range(8)]

    def copy_and_wait(image):
        resp = copy_image(admin_conn, image, ["slow", "edge"])
        assert resp.status_code == 202, resp.text
        wait_for(lambda: import_settled(admin_conn, image.id)
                 and {"slow", "edge"} <= stores_of(admin_conn, image.id),
                 timeout=120, interval=0.2, message=f"the copy of {image.id}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(copy_and_wait, images))

    for image in images:
        fresh = admin_conn.image.get_image(image.id)
        assert fresh.properties["stores"] == "fast,slow,edge"
        assert not fresh.properties.get("os_glance_import_task")
        assert not fresh.properties.get("os_glance_failed_import")


def test_copy_to_a_store_that_already_holds_the_image_is_rejected_with_400(admin_conn):
    image = upload_image(admin_conn, 4096, store="fast")

    resp = copy_image(admin_conn, image, ["fast"])

    assert resp.status_code == 400
    assert stores_of(admin_conn, image.id) == {"fast"}


def test_a_member_without_the_admin_role_gets_403_on_copy_image(member_conn):
    image = upload_image(member_conn, 4096, store="fast")

    resp = copy_image(member_conn, image, ["slow"])

    assert resp.status_code == 403
    assert stores_of(member_conn, image.id) == {"fast"}


@pytest.fixture
def notifications(transport_url):
    """A pooled oslo.messaging listener on Glance's exchange; yields a queue of events."""
    import oslo_messaging
    from oslo_config import cfg

    got: queue.Queue = queue.Queue()

    class Endpoint:
        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            got.put((event_type, payload))
            return oslo_messaging.NotificationResult.HANDLED

    transport = oslo_messaging.get_notification_transport(cfg.ConfigOpts(), url=transport_url)
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(exchange="glance", topic="notifications")],
        [Endpoint()], executor="threading", pool=f"test-{uuid.uuid4().hex[:8]}")
    listener.start()
    yield got
    listener.stop()
    listener.wait()
    transport.cleanup()


def test_glance_notifications_reach_a_pooled_oslo_messaging_listener(admin_conn, notifications):
    image = upload_image(admin_conn, 4096, store="fast")
    seen: set[str] = set()

    def saw_activate_and_update():
        while not notifications.empty():
            event_type, payload = notifications.get_nowait()
            if isinstance(payload, dict) and payload.get("id") == image.id:
                seen.add(event_type)
        return {"image.activate", "image.update"} <= seen

    wait_for(saw_activate_and_update, timeout=30, message="image.activate and image.update")
    assert threading.active_count() > 1
