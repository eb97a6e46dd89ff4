"""The fault proxy does what the reliability stories rely on, against the sandbox's real Glance.

The proxy sits where it does in the stories: between the client and the load balancer
(HAProxy's TLS frontend, verified with the sandbox's CA), with the two Glance API nodes
behind it. Requests carry a real Keystone token (keystonemiddleware refuses any other).
Each fault kind is checked from both ends: what the client got, what the proxy counted, and
what Glance itself saw (both API nodes' access logs and the image's state), so that "not
forwarded" and "dropped after Glance acted" are facts, not assumptions.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
import uuid

import openstack.config
import openstack.connection
import openstack.exceptions
import pytest
import yaml

import sandbox as sandbox_mod
from daemon import import_requests
from faultproxy import (
    FaultProxy,
    Rule,
    drop_after,
    drop_before,
    error,
    stall,
    store_not_found,
    too_many_requests,
    unauthorized,
    unavailable,
)
from helpers import import_settled, stores_of, upload_image, wait_for

JSON = {"Accept": "application/json"}
PATCH = {"Content-Type": "application/openstack-images-v2.1-json-patch", **JSON}
COPY_TO_SLOW = json.dumps({"method": {"name": "copy-image"}, "stores": ["slow"],
                           "all_stores_must_succeed": False})
STALL = 1.0          # seconds a stalled answer is held
STALL_SLACK = 15.0   # generous upper bound on top of it (a busy 2-core machine)


class GlanceLog:
    """Requests Glance itself served since this object was made, from the uWSGI access logs
    of every API node behind the load balancer (a request lands on either)."""

    def __init__(self, sandbox):
        """uWSGI logs a request after answering it: a request a fixture made just before may
        be logged late. A marker request to each node, once logged, says the earlier ones
        are too. (It has no token: the node's 401 is logged all the same.)"""
        self.paths = {node: sandbox.node_log(node) for node in sandbox_mod.NODES}
        self.offsets = dict.fromkeys(self.paths, 0)
        for node in self.paths:
            marker = f"/v2/images/{uuid.uuid4()}"
            call(node_port(sandbox, node), "GET", marker)
            wait_for(lambda m=marker: self.count("GET", m), timeout=10,
                     message=f"{node}'s access log")
        self.offsets = {node: path.stat().st_size for node, path in self.paths.items()}

    def count(self, method: str, path: str, node: str | None = None) -> int:
        """Requests logged by every node, or by `node` only."""
        return self.lines(node).count(f"] {method} {path} =>")

    def lines(self, node: str | None = None) -> str:
        text = ""
        for name, path in self.paths.items():
            if node in (None, name):
                with path.open("rb") as f:
                    f.seek(self.offsets[name])
                    text += f.read().decode(errors="replace")
        return text


def node_port(sandbox, node: str) -> int:
    return sandbox.state[node]["port"]


def call(port: int, method: str, path: str, body: str | bytes | None = None,
         headers: dict | None = None, conn: http.client.HTTPConnection | None = None,
         timeout: float = 30.0, chunked: bool = False, token: str | None = None):
    """One request with http.client; (response, body). `conn` keeps a connection alive;
    `chunked` sends the body with Transfer-Encoding: chunked; `token` is sent as
    X-Auth-Token (Glance answers 401 without one)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if chunked and isinstance(body, str):
        body = iter([body[:5].encode(), body[5:].encode()])
    sent = dict(JSON, **(headers or {}))
    if token:
        sent["X-Auth-Token"] = token
    try:
        conn.request(method, path, body=body, headers=sent, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        if own:
            conn.close()


def members_of(image) -> str:
    """A path only these tests ask for: other sessions' daemons may GET any image meanwhile,
    which would spoil a count of GET /v2/images/<id> in Glance's log."""
    return f"/v2/images/{image.id}/members"


def patch_property(port: int, image_id: str, name: str, **kw):
    body = json.dumps([{"op": "add", "path": f"/{name}", "value": "yes"}])
    return call(port, "PATCH", f"/v2/images/{image_id}", body, PATCH, **kw)


def proxy_threads(port: int) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"faultproxy-{port}-")]


@pytest.fixture(scope="module")
def image(admin_conn):
    """One small image in `fast` only, never copied anywhere by these tests."""
    img = upload_image(admin_conn, 1024, store="fast", name=f"faultproxy-{uuid.uuid4().hex[:6]}")
    yield img
    admin_conn.image.delete_image(img.id, ignore_missing=True)


@pytest.fixture(scope="module")
def token(admin_conn) -> str:
    """A Keystone token of imagesync's user (admin of the project that owns `image`)."""
    return admin_conn.session.get_token()


@pytest.fixture
def proxy(sandbox):
    """The proxy in front of the load balancer, as the stories use it."""
    with FaultProxy(sandbox.glance_url, cafile=sandbox.cacert,
                    keystone_url=sandbox.keystone_url) as p:
        yield p
    assert not p.errors, p.errors
    assert not proxy_threads(p.port)


@pytest.fixture
def glance_log(sandbox):
    return GlanceLog(sandbox)


# ---------------------------------------------------------------- forwarding and counting


def test_every_request_is_forwarded_and_counted_over_one_kept_alive_connection(
        proxy, image, glance_log, admin_conn, token):
    path = members_of(image)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        answers = [call(proxy.port, "GET", path, conn=conn, token=token) for _ in range(3)]
        sock = conn.sock
        resp, _ = patch_property(proxy.port, image.id, "fp_chunked", conn=conn, chunked=True,
                                 token=token)
        assert conn.sock is sock, "the proxy closed a kept-alive connection"
    finally:
        conn.close()

    assert [r.status for r, _ in answers] == [200, 200, 200]
    assert all("members" in json.loads(body) for _, body in answers)
    assert all(r.getheader("Connection") != "close" for r, _ in answers)
    assert resp.status == 200
    seen = proxy.requests(image_id=image.id)
    assert [(r.method, r.status, r.forwarded, r.upstream_status, r.fault) for r in seen] == \
        [("GET", 200, True, 200, None)] * 3 + [("PATCH", 200, True, 200, None)]
    assert len({r.connection for r in seen}) == 1
    wait_for(lambda: glance_log.count("GET", path) >= 3, timeout=10,
             message="Glance to log the three GETs")
    assert glance_log.count("GET", path) == 3, glance_log.lines()
    assert admin_conn.image.get_image(image.id).properties.get("fp_chunked") == "yes"


def test_openstacksdk_goes_through_the_proxy_with_the_clouds_yaml_it_writes(
        sandbox, proxy, image, tmp_path):
    clouds = proxy.write_clouds_yaml(tmp_path / "clouds.yaml", sandbox.clouds_yaml)
    assert clouds.stat().st_mode & 0o777 == 0o600
    source = yaml.safe_load(sandbox.clouds_yaml.read_text())["clouds"]
    written = yaml.safe_load(clouds.read_text())["clouds"]
    assert set(written) == set(source)
    for name, cloud in written.items():  # Glance via the proxy; the rest untouched
        assert cloud.pop("image_endpoint_override") == proxy.url, name
        assert cloud == source[name], name
    region = openstack.config.OpenStackConfig(
        config_files=[str(clouds)], load_envvars=False).get_one(sandbox_mod.CLOUD)
    conn = openstack.connection.Connection(config=region)
    proxy.add(too_many_requests(retry_after=3, method="GET", image_id=image.id, times=1))

    with pytest.raises(openstack.exceptions.HttpException) as raised:
        conn.image.get_image(image.id)
    assert raised.value.status_code == 429
    assert raised.value.response.headers["Retry-After"] == "3"
    assert conn.image.get_image(image.id).name == image.name

    assert [(r.status, r.forwarded) for r in proxy.requests("GET", image_id=image.id)] == \
        [(429, False), (200, True)]
    # It authenticated with the real Keystone (over TLS), not through the proxy
    assert not proxy.requests(path_re=r"^/v3|/auth/"), proxy.requests()
    assert conn.session.get_token()


def test_a_clouds_yaml_naming_the_upstream_gets_the_proxy_url_instead(sandbox, tmp_path):
    source = tmp_path / "source.yaml"
    source.write_text(yaml.safe_dump({"clouds": {"direct": {
        "auth_type": "token",
        "auth": {"auth_url": sandbox.keystone_url, "token": "x"},
        "image_endpoint_override": sandbox.glance_url + "/v2/",
        "cacert": str(sandbox.cacert)}}}))
    with FaultProxy(sandbox.glance_url, cafile=sandbox.cacert) as proxy:
        dest = tmp_path / "proxied.yaml"
        dest.write_text("old")
        dest.chmod(0o644)
        clouds = proxy.write_clouds_yaml(dest, source)

    assert clouds.stat().st_mode & 0o777 == 0o600
    cloud = yaml.safe_load(clouds.read_text())["clouds"]["direct"]
    assert cloud["image_endpoint_override"] == proxy.url
    assert cloud["auth"] == {"auth_url": sandbox.keystone_url, "token": "x"}
    assert sandbox.glance_url not in clouds.read_text()


def test_a_dead_upstream_gets_a_load_balancers_503_and_nothing_forwarded():
    port = sandbox_mod.free_port()
    with FaultProxy(f"http://127.0.0.1:{port}") as proxy:
        resp, body = call(proxy.port, "GET", "/v2/images")

    assert resp.status == 503
    assert b"No server is available" in body
    [seen] = proxy.requests()
    assert (seen.status, seen.forwarded, seen.upstream_status) == (503, False, None)


def test_the_load_balancers_certificate_is_verified(sandbox, token):
    """Without the sandbox's CA the proxy does not talk to HAProxy, and says why."""
    with FaultProxy(sandbox.glance_url) as proxy:  # the system's CAs only
        resp, _ = call(proxy.port, "GET", "/v2/images?limit=1", token=token)

    assert resp.status == 502
    [seen] = proxy.requests()
    assert (seen.status, seen.upstream_status) == (502, None)
    assert len(proxy.errors) == 1 and "TLS verification failed" in proxy.errors[0], \
        proxy.errors
    assert token not in proxy.errors[0]


def test_one_api_node_can_be_the_upstream_directly(sandbox, image, token):
    node = sandbox_mod.NODES[1]
    log = GlanceLog(sandbox)
    with FaultProxy(sandbox.node_url(node)) as proxy:
        resp, body = call(proxy.port, "GET", members_of(image), token=token)

    assert resp.status == 200 and "members" in json.loads(body)
    assert not proxy.errors, proxy.errors
    wait_for(lambda: log.count("GET", members_of(image)) >= 1, timeout=10,
             message=f"{node} to log the GET")
    assert log.count("GET", members_of(image), node=node) == 1
    assert log.count("GET", members_of(image)) == 1


# ---------------------------------------------------------------- answers without Glance


def test_429_with_and_without_retry_after_is_not_forwarded(proxy, image, glance_log, token):
    path = members_of(image)
    proxy.add(too_many_requests(retry_after=7, method="GET", image_id=image.id, times=1))
    proxy.add(too_many_requests(method="GET", image_id=image.id, times=1))

    answers = [call(proxy.port, "GET", path, token=token)[0] for _ in range(3)]

    assert [r.status for r in answers] == [429, 429, 200]
    assert answers[0].getheader("Retry-After") == "7"
    assert answers[1].getheader("Retry-After") is None
    assert [(r.status, r.forwarded, r.fault) for r in proxy.requests(image_id=image.id)] == \
        [(429, False, "429"), (429, False, "429"), (200, True, None)]
    wait_for(lambda: glance_log.count("GET", path) >= 1, timeout=10, message="Glance's GET")
    assert glance_log.count("GET", path) == 1


def test_a_503_burst_after_a_skip_then_rules_changed_at_run_time(proxy, image, glance_log,
                                                                 token):
    path = members_of(image)
    burst = proxy.add(unavailable(image_id=image.id, skip=1, times=3))

    statuses = [call(proxy.port, "GET", path, token=token)[0].status for _ in range(5)]
    forever = proxy.add(error(500, path=r"^/v2/images/"))
    during = call(proxy.port, "GET", path, token=token)[0].status
    proxy.remove(forever)
    after = call(proxy.port, "GET", path, token=token)[0].status

    assert statuses == [200, 503, 503, 503, 200]
    assert (burst.seen, burst.hits, burst.exhausted) == (7, 3, True)  # it saw all 7
    assert (during, forever.hits, after) == (500, 1, 200)
    assert proxy.count("GET", image_id=image.id) == 7
    forwarded = sum(r.forwarded for r in proxy.requests(image_id=image.id))
    assert forwarded == 3
    wait_for(lambda: glance_log.count("GET", path) >= forwarded, timeout=10,
             message="Glance's GETs")
    assert glance_log.count("GET", path) == forwarded


@pytest.mark.parametrize("status,shape", [(500, "glance"), (502, "haproxy"), (504, "haproxy")])
def test_5xx_answers_have_the_shape_of_who_gives_them(proxy, image, status, shape):
    proxy.add(error(status, times=1))

    resp, body = call(proxy.port, "GET", f"/v2/images/{image.id}")

    assert resp.status == status
    if shape == "glance":  # webob's page, as JSON since the client accepts JSON
        assert json.loads(body)["code"] == "500 Internal Server Error"
    else:
        assert body.startswith(f"<html><body><h1>{status} ".encode())
    assert [(r.status, r.forwarded) for r in proxy.requests()] == [(status, False)]


def test_401_is_keystonemiddlewares_answer_and_is_not_forwarded(sandbox, proxy, image,
                                                                glance_log, token):
    path = members_of(image)
    proxy.add(unauthorized(times=1))

    resp, body = call(proxy.port, "GET", path, token=token)
    again, _ = call(proxy.port, "GET", path, token=token)
    real, real_body = call(proxy.port, "GET", path, token=f"revoked-{uuid.uuid4().hex}")

    assert (resp.status, again.status, real.status) == (401, 200, 401)
    # byte for byte what keystonemiddleware answers for a token it refuses
    assert body == real_body
    for header in ("Content-Type", "WWW-Authenticate"):
        assert resp.getheader(header) == real.getheader(header), header
    assert real.getheader("WWW-Authenticate") == f'Keystone uri="{sandbox.keystone_url}"'
    assert [(r.status, r.forwarded) for r in proxy.requests()] == \
        [(401, False), (200, True), (401, True)]
    wait_for(lambda: glance_log.count("GET", path) >= 2, timeout=10, message="Glance's GETs")
    assert glance_log.count("GET", path) == 2


@pytest.mark.parametrize("accept", ["application/json", "*/*", None, "text/plain",
                                    "application/json;q=0.9, text/html;q=0.5"])
def test_store_not_found_is_byte_for_byte_glances_409(sandbox, proxy, image, accept, token):
    """A node lacking `edge` answers exactly as Glance does for a store it does not know."""
    headers = {"Accept": accept} if accept else {}
    headers["X-Auth-Token"] = token
    direct = http.client.HTTPConnection("127.0.0.1", node_port(sandbox, sandbox_mod.NODES[0]),
                                        timeout=30)
    try:
        direct.request("POST", f"/v2/images/{image.id}/import", headers={
            "Content-Type": "application/json", **headers}, body=json.dumps(
            {"method": {"name": "copy-image"}, "stores": ["nowhere"]}))
        real = direct.getresponse()
        real_body = real.read()
    finally:
        direct.close()
    proxy.add(store_not_found("edge"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        answers = []
        for stores in (["edge"], ["fast"], ["slow", "edge"]):
            conn.request("POST", f"/v2/images/{image.id}/import", headers={
                "Content-Type": "application/json", **headers}, body=json.dumps(
                {"method": {"name": "copy-image"}, "stores": stores}))
            resp = conn.getresponse()
            answers.append((resp, resp.read()))
    finally:
        conn.close()

    assert real.status == 409
    (fake, fake_body), (present, _), (both, _) = answers
    assert fake.status == 409 and both.status == 409
    assert fake.getheader("Content-Type") == real.getheader("Content-Type")
    assert fake_body == real_body.replace(b"nowhere", b"edge")
    assert present.status == 400  # "already present": forwarded, Glance copies nothing
    assert [(r.stores, r.forwarded, r.upstream_status) for r in proxy.requests("POST")] == \
        [(("edge",), False, None), (("fast",), True, 400), (("slow", "edge"), False, None)]
    assert proxy.imports_per_image() == {}


# ---------------------------------------------------------------- dropped connections


@pytest.mark.parametrize("reset,raised", [(True, ConnectionResetError),
                                          (False, http.client.RemoteDisconnected)])
def test_a_drop_before_forwarding_never_reaches_glance(proxy, image, glance_log, admin_conn,
                                                       token, reset, raised):
    prop = f"fp_before_{uuid.uuid4().hex[:6]}"
    proxy.add(drop_before(method="PATCH", image_id=image.id, times=1, reset=reset))

    with pytest.raises(raised):
        patch_property(proxy.port, image.id, prop, token=token)

    [seen] = proxy.requests("PATCH")
    assert (seen.status, seen.forwarded, seen.upstream_status) == (None, False, None)
    assert prop not in admin_conn.image.get_image(image.id).properties
    assert glance_log.count("PATCH", f"/v2/images/{image.id}") == 0


def test_a_drop_after_forwarding_leaves_the_change_applied(proxy, image, glance_log, admin_conn,
                                                           token):
    prop = f"fp_after_{uuid.uuid4().hex[:6]}"
    rule = proxy.add(drop_after(method="PATCH", image_id=image.id, times=1))

    with pytest.raises(ConnectionError):
        patch_property(proxy.port, image.id, prop, token=token)

    [seen] = proxy.requests("PATCH")
    assert (seen.status, seen.forwarded, seen.upstream_status) == (None, True, 200)
    assert rule.hits == 1
    assert admin_conn.image.get_image(image.id).properties.get(prop) == "yes"
    wait_for(lambda: glance_log.count("PATCH", f"/v2/images/{image.id}") == 1, timeout=10,
             message="Glance to log the PATCH")


def test_an_import_dropped_after_glance_took_it_copies_and_counts_once(sandbox, proxy,
                                                                       admin_conn, token):
    img = upload_image(admin_conn, 4096, store="fast", name=f"faultproxy-{uuid.uuid4().hex[:6]}")
    try:
        proxy.add(drop_after(method="POST", path=r"/import$", image_id=img.id, times=1))

        with pytest.raises(ConnectionError):
            call(proxy.port, "POST", f"/v2/images/{img.id}/import", COPY_TO_SLOW,
                 {"Content-Type": "application/json"}, token=token)

        wait_for(lambda: import_settled(admin_conn, img.id)
                 and stores_of(admin_conn, img.id) == {"fast", "slow"},
                 timeout=60, message="Glance to copy the image the client never heard about")
        [seen] = proxy.requests("POST", image_id=img.id)
        assert (seen.status, seen.upstream_status, seen.stores) == (None, 202, ("slow",))
        assert proxy.imports_per_image() == {img.id: 1}
        assert import_requests(sandbox, img.id) == 1
    finally:
        admin_conn.image.delete_image(img.id, ignore_missing=True)


# ---------------------------------------------------------------- stalls


def test_a_stalled_answer_arrives_after_the_stall_and_not_much_later(proxy, image, token):
    proxy.add(stall(STALL, method="GET", image_id=image.id, times=1))

    started = time.monotonic()
    resp, _ = call(proxy.port, "GET", f"/v2/images/{image.id}", token=token)
    took = time.monotonic() - started

    assert resp.status == 200
    assert STALL <= took < STALL + STALL_SLACK, took
    assert [(r.status, r.forwarded, r.fault) for r in proxy.requests()] == \
        [(200, True, f"stall {STALL:g}s then answer")]


def test_a_stall_held_before_glance_then_dropped_never_reaches_glance(proxy, image, admin_conn,
                                                                      glance_log, token):
    prop = f"fp_stalled_{uuid.uuid4().hex[:6]}"
    proxy.add(stall(STALL, then="drop", forward_first=False, method="PATCH", image_id=image.id))

    started = time.monotonic()
    with pytest.raises(ConnectionError):
        patch_property(proxy.port, image.id, prop, token=token)
    took = time.monotonic() - started

    assert STALL <= took < STALL + STALL_SLACK, took
    assert prop not in admin_conn.image.get_image(image.id).properties
    assert glance_log.count("PATCH", f"/v2/images/{image.id}") == 0
    assert [(r.status, r.forwarded) for r in proxy.requests()] == [(None, False)]


# ---------------------------------------------------------------- rates


def test_rates_are_the_busiest_sliding_windows(sandbox, image, token):
    """Arrival times come from an injected clock, so the windows are exact."""
    now = [0.0]
    schedule = [(0.0, True), (0.2, True), (0.5, True), (0.9, True), (0.95, False),
                (1.5, True), (30.0, True), (59.9, True), (61.0, True), (61.1, True)]
    with FaultProxy(sandbox.glance_url, cafile=sandbox.cacert, clock=lambda: now[0]) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        try:
            for t, about_image in schedule:
                now[0] = t
                resp, _ = call(proxy.port, "GET", f"/v2/images/{image.id}" if about_image
                               else "/versions", conn=conn, token=token)
                assert resp.status == 200
        finally:
            conn.close()

    assert proxy.peak_rate() == 5                  # 0 .. 0.95, one of them not about the image
    assert proxy.image_rate(image.id, window=1.0) == 4
    assert proxy.image_rate(image.id) == 7         # 0 .. 59.9
    assert proxy.image_rates() == {image.id: 7}
    assert proxy.peak_rate(window=60.0) == 8
    assert proxy.count(since=61.0) == 2
    assert proxy.image_rate(image.id, since=1.0) == 5
    proxy.clear()
    assert proxy.requests() == [] and proxy.peak_rate() == 0


def test_a_probability_rule_is_seeded_and_its_hits_are_what_the_client_saw(proxy, image,
                                                                            glance_log, token):
    path = members_of(image)
    rule = proxy.add(unavailable(probability=0.5, image_id=image.id))

    statuses = [call(proxy.port, "GET", path, token=token)[0].status for _ in range(20)]

    assert 0 < rule.hits < 20
    assert statuses.count(503) == rule.hits
    assert statuses.count(200) == 20 - rule.hits
    wait_for(lambda: glance_log.count("GET", path) >= 20 - rule.hits, timeout=10,
             message="Glance's GETs")
    assert glance_log.count("GET", path) == 20 - rule.hits


# ---------------------------------------------------------------- life and hygiene


def test_stop_is_bounded_and_leaves_no_thread_with_a_stall_and_an_idle_connection(sandbox,
                                                                                   image, token):
    proxy = FaultProxy(sandbox.glance_url, cafile=sandbox.cacert, stop_timeout=10).start()
    port = proxy.port
    proxy.add(stall(300, method="GET", image_id=image.id))
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    call(port, "GET", "/versions", conn=idle)  # now kept alive, idle
    outcome: list[BaseException] = []

    def stalled_client():
        try:
            call(port, "GET", f"/v2/images/{image.id}", timeout=60, token=token)
        except BaseException as exc:  # what the client saw is the point
            outcome.append(exc)

    client = threading.Thread(target=stalled_client)
    client.start()
    [held] = wait_for(lambda: [r for r in proxy.requests(image_id=image.id) if r.upstream_status],
                      timeout=10, message="Glance to answer the request the proxy holds")
    assert (held.finished, held.forwarded, held.status) == (False, True, None)
    started = time.monotonic()
    proxy.stop()
    took = time.monotonic() - started
    client.join(30)
    idle.close()

    assert took < 10, took
    assert not proxy_threads(port)
    assert outcome and isinstance(outcome[0], ConnectionError), outcome
    [seen] = proxy.requests(image_id=image.id)
    assert (seen.finished, seen.forwarded, seen.upstream_status, seen.status) == \
        (True, True, 200, None)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the proxy still listens after stop"
    assert not proxy.errors, proxy.errors
    proxy.clear_rules()
    proxy.start()  # a restart listens on the same port
    try:
        assert call(port, "GET", "/versions")[0].status == 200
    finally:
        proxy.stop()
    assert not proxy_threads(port)


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(sandbox):
    with FaultProxy(sandbox.glance_url, cafile=sandbox.cacert, idle_timeout=0.5) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        try:
            assert call(proxy.port, "GET", "/versions", conn=conn)[0].status == 200
            sock = conn.sock

            def closed_by_proxy() -> bool:
                ready, _, _ = select.select([sock], [], [], 0)
                return bool(ready) and sock.recv(1, socket.MSG_PEEK) == b""

            wait_for(closed_by_proxy, timeout=15, message="the proxy to close the idle connection")
        finally:
            conn.close()


def test_no_header_is_ever_logged_or_kept(proxy, image, caplog, capfd, token):
    """Neither a valid token (forwarded, Glance answers) nor a refused one shows anywhere."""
    refused = f"token-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger="faultproxy")
    proxy.add(too_many_requests(retry_after=1, method="GET", times=1))
    proxy.add(drop_before(method="HEAD", times=1))

    statuses = [call(proxy.port, "GET", f"/v2/images/{image.id}", token=token)[0].status
                for _ in range(2)]
    statuses.append(call(proxy.port, "GET", f"/v2/images/{image.id}", token=refused)[0].status)
    with pytest.raises(ConnectionError):
        call(proxy.port, "HEAD", f"/v2/images/{image.id}", token=token)

    assert statuses == [429, 200, 401]
    out, err = capfd.readouterr()
    assert "faultproxy GET" in caplog.text  # it does log, just never a header
    for text in (caplog.text, out, err, repr(proxy.requests()), repr(proxy.rules),
                 "".join(proxy.errors), repr(vars(proxy))):
        assert token not in text and refused not in text


def test_bad_rules_and_upstreams_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="action 'explode'"):
        Rule("explode")
    with pytest.raises(ValueError, match="not a regular expression"):
        Rule("answer", path="(")
    with pytest.raises(ValueError, match="probability"):
        Rule("answer", probability=2)
    with pytest.raises(ValueError, match=r"not an http\(s\)://127.0.0.1:PORT URL"):
        FaultProxy("http://192.0.2.1:9292")
    with pytest.raises(ValueError, match=r"not an http\(s\)://127.0.0.1:PORT URL"):
        FaultProxy("ftp://127.0.0.1:9292")
    with pytest.raises(ValueError, match="plain http"):
        FaultProxy("http://127.0.0.1:9292", cafile="/nowhere/ca.pem")
