"""The sandbox is real: Glance copies between stores, enforces its policy, and notifies; and
each production part is the real thing: Keystone issues and validates tokens, Glance refuses
a request without one (through HAProxy and on a node), HAProxy spreads requests over both
Glance API nodes, TLS is served with the sandbox CA's certificate, and RabbitMQ has no guest
and gives imagesync's user no right to publish as Glance.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import amqp.exceptions
import kombu
import pytest

import sandbox as sandbox_mod
from helpers import (
    connect,
    delete_project_images,
    import_settled,
    stores_of,
    upload_image,
    wait_for,
)


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
    """A pooled oslo.messaging listener on Glance's exchange, as imagesync's RabbitMQ user
    (its pool queue must be named imagesync*); yields a queue of events."""
    import oslo_messaging
    from oslo_config import cfg

    got: queue.Queue = queue.Queue()

    class Endpoint:
        def info(self, ctxt, publisher_id, event_type, payload, metadata):
            got.put((event_type, payload))
            return oslo_messaging.NotificationResult.HANDLED

    pool = f"imagesync-test-{uuid.uuid4().hex[:8]}"
    transport = oslo_messaging.get_notification_transport(cfg.ConfigOpts(), url=transport_url)
    listener = oslo_messaging.get_notification_listener(
        transport, [oslo_messaging.Target(exchange="glance", topic="notifications")],
        [Endpoint()], executor="threading", pool=pool)
    listener.start()
    yield got
    listener.stop()
    listener.wait()
    transport.cleanup()
    delete_queue(transport_url, pool)  # else it keeps collecting Glance's notifications


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


# -- each part of the sandbox is real ---------------------------------------------------------


def amqp_url(transport_url: str) -> str:
    return re.sub(r"^rabbit://", "amqp://", transport_url)


def delete_queue(transport_url: str, name: str) -> None:
    with kombu.Connection(amqp_url(transport_url)) as conn, \
            contextlib.suppress(conn.channel_errors):  # already gone
        conn.default_channel.queue_delete(name)


def request(url: str, method: str = "GET", body: dict | None = None,
            headers: dict | None = None, context: ssl.SSLContext | None = None):
    """urllib: (status, headers, body text); an HTTP error status is an answer too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read().decode()


def password_token(sandbox, user: str, project: str) -> tuple[int, str | None, dict]:
    """POST /v3/auth/tokens as a Keystone user with its password, over HAProxy's TLS."""
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"id": "default"}, "password": sandbox.password(user)}}},
        "scope": {"project": {"id": sandbox.projects[project]}}}}
    status, headers, text = request(sandbox.keystone_url + "/auth/tokens", "POST", body,
                                    context=sandbox.tls_context())
    return status, headers.get("X-Subject-Token"), json.loads(text)


def test_keystone_issues_a_token_over_tls_and_validates_it(sandbox):
    assert sandbox.keystone_url.startswith("https://")

    status, token, body = password_token(sandbox, "member-a", "tenant-a")

    assert status == 201, body
    assert token, "no X-Subject-Token header"
    assert body["token"]["user"]["name"] == "member-a"
    assert body["token"]["project"]["id"] == sandbox.projects["tenant-a"]
    assert {r["name"] for r in body["token"]["roles"]} >= {"member", "reader"}
    assert "admin" not in {r["name"] for r in body["token"]["roles"]}
    assert any(s["type"] == "image" for s in body["token"]["catalog"]), \
        "Glance is not in Keystone's catalog"
    checked, _, text = request(sandbox.keystone_url + "/auth/tokens", headers={
        "X-Auth-Token": token, "X-Subject-Token": token}, context=sandbox.tls_context())
    assert checked == 200, text
    assert json.loads(text)["token"]["user"]["name"] == "member-a"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    refused, _, _ = request(sandbox.keystone_url + "/auth/tokens", headers={
        "X-Auth-Token": token, "X-Subject-Token": forged}, context=sandbox.tls_context())
    assert refused == 404, f"Keystone answered {refused} for a forged token"
    bad = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "member-a", "domain": {"id": "default"}, "password": "not-the-password"}}}}}
    denied, _, _ = request(sandbox.keystone_url + "/auth/tokens", "POST", bad,
                           context=sandbox.tls_context())
    assert denied == 401


@pytest.mark.parametrize("where", ["haproxy", "glance1", "glance2"])
def test_glance_refuses_a_request_without_a_token_naming_keystone(sandbox, where):
    url = sandbox.glance_url if where == "haproxy" else sandbox.node_url(where)
    context = sandbox.tls_context() if where == "haproxy" else None
    # The header identity of the old sandbox is no identity at all now.
    old_identity = {"X-Project-Id": sandbox.projects["imagesync"], "X-Roles": "admin",
                    "X-Identity-Status": "Confirmed"}

    for headers in ({}, old_identity, {"X-Auth-Token": uuid.uuid4().hex}):
        status, answer, text = request(url + "/v2/images", headers=headers, context=context)

        assert status == 401, (headers, status, text)
        assert answer.get("WWW-Authenticate") == f"Keystone uri=\"{sandbox.keystone_url}\"", \
            answer.get("WWW-Authenticate")


def test_haproxy_spreads_authenticated_requests_over_both_glance_nodes(sandbox, admin_conn):
    token = admin_conn.session.get_token()
    marker = uuid.uuid4().hex
    n = 20

    for _ in range(n):
        status, _, text = request(f"{sandbox.glance_url}/v2/images?name={marker}",
                                  headers={"X-Auth-Token": token},
                                  context=sandbox.tls_context())
        assert status == 200, text
        assert json.loads(text)["images"] == []

    def served(node: str) -> int:
        return sandbox.node_log(node).read_text(errors="replace").count(
            f"GET /v2/images?name={marker} => ")

    wait_for(lambda: sum(served(node) for node in sandbox_mod.NODES) == n, timeout=10,
             message=f"the {n} requests in the nodes' access logs")
    counts = {node: served(node) for node in sandbox_mod.NODES}
    assert all(counts.values()), f"one node served everything: {counts}"
    # HAProxy's own log names the server of each request (a line when the stream ends).
    haproxy = Path(sandbox.dir) / "log" / "haproxy.log"

    def routed() -> list[str]:
        return re.findall(rf"glance_api_nodes/(\w+) \S+ 200 .*\"GET /v2/images\?name={marker} ",
                          haproxy.read_text(errors="replace"))

    wait_for(lambda: len(routed()) == n, timeout=10, message=f"{n} lines in HAProxy's log")
    assert {node: routed().count(node) for node in sandbox_mod.NODES} == counts


def test_tls_is_served_with_a_certificate_only_the_sandbox_ca_verifies(sandbox):
    for url in (sandbox.glance_url + "/healthcheck", sandbox.keystone_url):
        assert url.startswith("https://")
        # The system's trust store does not know the sandbox's CA.
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(url, timeout=10, context=ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value
        assert "certificate verify failed" in str(refused.value.reason)

        with urllib.request.urlopen(url, timeout=10, context=sandbox.tls_context()) as resp:
            assert resp.status == 200

    host, port = "127.0.0.1", sandbox.state["haproxy"]["glance_port"]
    with socket.create_connection((host, port), timeout=10) as raw, \
            sandbox.tls_context().wrap_socket(raw, server_hostname=host) as tls:
        cert = tls.getpeercert()
    issuer = dict(pair[0] for pair in cert["issuer"])
    assert issuer["commonName"] == "imagesync sandbox CA"
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]


def test_rabbitmq_has_no_guest_and_only_glance_may_publish_to_its_exchange(sandbox):
    port = sandbox.state["rabbit"]["port"]
    for vhost in ("openstack", ""):
        with pytest.raises(amqp.exceptions.AccessRefused):
            with kombu.Connection(f"amqp://guest:guest@127.0.0.1:{port}/{vhost}",
                                  connect_timeout=10) as guest:
                guest.connect()
    assert "guest" not in sandbox.rabbitmqctl("list_users", "-q").split()

    queue_name, key = f"imagesync-proof-{uuid.uuid4().hex[:8]}", f"proof-{uuid.uuid4().hex}"
    exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
    try:
        with kombu.Connection(amqp_url(sandbox.transport_url)) as mine:
            # imagesync's user owns queues imagesync* and may bind them to Glance's exchange.
            q = kombu.Queue(queue_name, exchange, routing_key=key, durable=False,
                            channel=mine.default_channel)
            q.declare()
            with pytest.raises(amqp.exceptions.AccessRefused):
                kombu.Queue(f"other-{uuid.uuid4().hex[:8]}", channel=mine.channel()).declare()
        with kombu.Connection(amqp_url(sandbox.transport_url),
                              transport_options={"confirm_publish": True}) as mine:
            with pytest.raises(amqp.exceptions.AccessRefused) as refused:
                mine.Producer().publish({"from": "imagesync"}, exchange=exchange,
                                        routing_key=key, serializer="json")
            assert "exchange 'glance'" in str(refused.value), refused.value
        with kombu.Connection(amqp_url(sandbox.glance_transport_url),
                              transport_options={"confirm_publish": True}) as glance:
            glance.Producer().publish({"from": "glance"}, exchange=exchange, routing_key=key,
                                      serializer="json")
        with kombu.Connection(amqp_url(sandbox.transport_url)) as mine:
            got = []
            q = kombu.Queue(queue_name, exchange, routing_key=key, durable=False,
                            channel=mine.default_channel)
            wait_for(lambda: got.append(q.get(no_ack=True)) or got[-1], timeout=10,
                     message="glance's message in imagesync's queue")
            assert got[-1].payload == {"from": "glance"}
            assert q.get(no_ack=True) is None, "imagesync's refused message arrived too"
    finally:
        delete_queue(sandbox.transport_url, queue_name)


# -- Keystone unified limits (up(unified_limits=True)) -----------------------------------------

MiB = 1 << 20


def glance_usage(conn) -> dict:
    """GET /v2/info/usage as `conn`: {resource: {"usage", "limit"}} of its project."""
    resp = conn.image.get("/info/usage")
    assert resp.status_code == 200, resp.text
    return resp.json()["usage"]


def put_data(conn, image_id: str, size: int, store: str = "fast"):
    data = (uuid.uuid4().bytes * (size // 16 + 1))[:size]
    return conn.image.put(f"/images/{image_id}/file", data=data,
                          headers={"Content-Type": "application/octet-stream",
                                   "X-Image-Meta-Store": store})


def new_image(conn):
    return conn.image.create_image(name=f"test-{uuid.uuid4().hex[:8]}", disk_format="raw",
                                   container_format="bare", visibility="shared")


# Releases whose unified-limits check of an upload counts the upload's own size (Glance 33
# passes it as the delta); 2024.1 and 2025.1 check the usage before it only.
UPLOAD_SIZE_COUNTED = {"33"}


def test_glance_enforces_unified_limits_on_uploads_but_copy_image_checks_the_caller(
        limits_sandbox):
    box = limits_sandbox
    owner, imagesync = connect(box, "sandbox-owner"), connect(box, sandbox_mod.CLOUD)
    tenant_a, own_project = box.projects["tenant-a"], box.projects["imagesync"]
    assert box.unified_limits
    delete_project_images(owner, tenant_a)   # a shared sandbox: usage starts from none
    assert box.limits() == {"registered": sandbox_mod.GLANCE_LIMITS, "projects": {}}

    # Glance reports the registered limits of all four of its resources.
    start = glance_usage(owner)
    print(f"\ntenant-a at start: {start}")
    assert {name: u["limit"] for name, u in start.items()} == sandbox_mod.GLANCE_LIMITS
    assert start["image_size_total"]["usage"] == 0
    # A registered limit changed in Keystone is what Glance reports next.
    box.set_limit("image_count_total", 9999)
    assert glance_usage(owner)["image_count_total"]["limit"] == 9999
    box.set_limit("image_count_total", sandbox_mod.GLANCE_LIMITS["image_count_total"])

    # tenant-a may hold 2 MiB: 1 MiB fits, 2 MiB more does not (Glance answers 413).
    box.set_limit("image_size_total", 2, tenant_a)
    assert box.limits()["projects"] == {tenant_a: {"image_size_total": 2}}
    assert glance_usage(owner)["image_size_total"] == {"usage": 0, "limit": 2}
    small = upload_image(owner, MiB)
    assert glance_usage(owner)["image_size_total"] == {"usage": 1, "limit": 2}
    big = new_image(owner)
    if box.glance_release in UPLOAD_SIZE_COUNTED:
        refused = put_data(owner, big.id, 2 * MiB)
        print(f"2 MiB upload at 1/2 MiB: HTTP {refused.status_code}")
        assert refused.status_code == 413, refused.text
        assert "image_size_total is over limit of 2 due to current usage 1 and delta 2" \
            in refused.text, refused.text
    else:
        # An older Glance checks the usage before the upload, not the upload's size: the
        # 2 MiB fit while tenant-a is under its limit, and the next upload is refused.
        extra = upload_image(owner, 2 * MiB)
        refused = put_data(owner, big.id, 2 * MiB)
        print(f"2 MiB upload at 3/2 MiB (Glance {box.glance_release}): "
              f"HTTP {refused.status_code}")
        assert refused.status_code == 413, refused.text
        assert "image_size_total is over limit of 2 due to current usage 3 and delta 0" \
            in refused.text, refused.text
        owner.image.delete_image(extra)
    assert owner.image.get_image(big.id).status == "queued"

    # Raised to 3 MiB: the same upload succeeds, and tenant-a is at its limit.
    box.set_limit("image_size_total", 3, tenant_a)
    accepted = put_data(owner, big.id, 2 * MiB)
    assert accepted.status_code == 204, accepted.text
    at_limit = glance_usage(owner)["image_size_total"]
    print(f"tenant-a after the retry: image_size_total {at_limit}")
    assert at_limit == {"usage": 3, "limit": 3}
    # At its limit, tenant-a's next upload is refused; an older Glance refuses it only once
    # tenant-a is over its limit.
    one_more = new_image(owner)
    assert put_data(owner, one_more.id, MiB).status_code == (
        413 if box.glance_release in UPLOAD_SIZE_COUNTED else 204)
    owner.image.delete_image(one_more)

    # copy-image checks the CALLER's image_size_total, not the owner's: imagesync over its
    # own limit is refused...
    token = imagesync.session.get_token()

    def copy_to_slow(image_id: str):
        return request(f"{box.glance_url}/v2/images/{image_id}/import", "POST",
                       {"method": {"name": "copy-image"}, "stores": ["slow"],
                        "all_stores_must_succeed": False},
                       headers={"X-Auth-Token": token}, context=box.tls_context())

    upload_image(imagesync, MiB)
    box.set_limit("image_size_total", 0, own_project)
    status, _, text = copy_to_slow(small.id)
    print(f"copy-image by imagesync over its own limit (1/0 MiB): HTTP {status}")
    assert status == 413, text
    assert f"Project {own_project} is over a limit" in text, text
    assert stores_of(imagesync, small.id) == {"fast"}

    # ...and, within its own, accepted although tenant-a, the owner, is at its limit.
    box.delete_limit("image_size_total", own_project)
    status, _, text = copy_to_slow(small.id)
    print(f"copy-image by imagesync of tenant-a's 1 MiB image, tenant-a at 3/3 MiB: "
          f"HTTP {status}")
    assert status == 202, text
    wait_for(lambda: import_settled(imagesync, small.id)
             and stores_of(imagesync, small.id) == {"fast", "slow"},
             timeout=60, message="the copy of tenant-a's image to slow")

    # Glance counts the owner's usage as size x locations: tenant-a is now over its limit.
    after = glance_usage(owner)["image_size_total"]
    mine = glance_usage(imagesync)["image_size_total"]
    print(f"tenant-a after the copy: image_size_total {after}; imagesync's: {mine}")
    assert after == {"usage": 3 + small.size // MiB, "limit": 3}
    assert mine["usage"] == 1

    box.delete_limit("image_size_total", tenant_a)
    assert box.limits()["projects"] == {}
    assert glance_usage(owner)["image_size_total"]["limit"] == \
        sandbox_mod.GLANCE_LIMITS["image_size_total"]
