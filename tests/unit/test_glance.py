"""Stories about the Glance adapter's transport: each request sent once, and every kind of
non-answer told apart (429 with its Retry-After, 5xx, 401, Keystone down or refusing, a
connection dropped before or after the request was sent).

Runs the real openstacksdk/keystoneauth stack against a scripted HTTP server on 127.0.0.1,
which counts what it receives, as Glance's access log would. Fast: no sandbox needed.
"""

from __future__ import annotations

import socket
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openstack.config
import openstack.connection
import pytest
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import plugin

from imagesync.glance import (
    CredentialsRejected,
    Glance,
    GlanceUnavailable,
    KeystoneUnavailable,
    RateLimited,
)

IMAGE = "1d818d51-f1d8-4f02-a97d-aeedcba99c00"


class Server(ThreadingHTTPServer):
    """Answers each request with the next scripted answer (then 200 {}); counts requests."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list = []
        self.seen: list[tuple[str, str, str | None]] = []   # method, path, token
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:
        pass

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path in ("/", "/v2", "/v2/"):   # openstacksdk's version discovery, not counted
            self.send_json(200, {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [
                {"rel": "self", "href": f"{self.server.url}/v2/"}]}]})
            return
        self.server.seen.append((self.command, self.path, self.headers.get("X-Auth-Token")))
        step = self.server.script.pop(0) if self.server.script else (200, {}, b"{}")
        if step == "drop":   # the request arrived; the connection closes with no answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, body = step
        self.send(status, headers, body)

    def send_json(self, status: int, doc) -> None:
        import json

        self.send(status, {}, json.dumps(doc).encode())

    def send(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer


class Renewable(plugin.BaseAuthPlugin):
    """A token that keystoneauth can renew (as a password plugin can), or a failing Keystone."""

    def __init__(self, fail: Exception | None = None):
        super().__init__()
        self.renewed, self.fail = 0, fail

    def get_headers(self, session, **kwargs):
        if self.fail is not None:
            raise self.fail
        return {"X-Auth-Token": f"token-{self.renewed}"}

    def invalidate(self) -> bool:
        self.renewed += 1
        return True


@pytest.fixture
def server():
    srv = Server()
    srv.thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def connect(tmp_path, url: str) -> Glance:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(f"clouds:\n  t:\n    auth_type: none\n    auth:\n      endpoint: {url}\n"
                      f"    image_endpoint_override: {url}\n    image_api_version: '2'\n")
    region = openstack.config.OpenStackConfig(
        config_files=[str(clouds)], load_envvars=False).get_one("t")
    return Glance(openstack.connection.Connection(config=region), rate=1000.0, timeout=5.0)


@pytest.fixture
def glance(tmp_path, server) -> Glance:
    return connect(tmp_path, server.url)


def error(status: int, **headers) -> tuple:
    return status, headers, b'{"message": "refused"}'


# -- one request each: the executor's discipline decides about retries --------------------------


def test_a_503_is_sent_once_although_openstacksdk_would_retry_it_five_times(glance, server):
    server.script = [error(503)] * 6
    with pytest.raises(GlanceUnavailable) as caught:
        glance.get_image(IMAGE)
    assert caught.value.status == 503 and not caught.value.maybe_sent
    assert len(server.seen) == 1
    assert glance.requests_here() == 1


def test_a_429_is_sent_once_and_its_retry_after_is_read(glance, server):
    server.script = [error(429, **{"Retry-After": "7"})]
    with pytest.raises(RateLimited) as caught:
        glance.get_image(IMAGE)
    assert (caught.value.status, caught.value.retry_after) == (429, 7.0)
    assert len(server.seen) == 1


def test_a_retry_after_given_as_a_date_is_read_as_seconds(glance, server):
    import time

    server.script = [error(503, **{"Retry-After": formatdate(time.time() + 120, usegmt=True)})]
    with pytest.raises(GlanceUnavailable) as caught:
        glance.get_image(IMAGE)
    assert 100 < caught.value.retry_after <= 120


def test_a_429_to_the_store_detail_list_does_not_fall_back_to_the_plain_list(glance, server):
    server.script = [error(429)]
    with pytest.raises(RateLimited):
        glance.stores()
    assert [path for _, path, _ in server.seen] == ["/v2/info/stores/detail"]


def stores_answer(*ids: str) -> tuple:
    import json

    return 200, {}, json.dumps({"stores": [{"id": i, "type": "file"} for i in ids]}).encode()


def test_a_store_one_api_node_lacks_stays_live_when_another_node_lists_it(glance, server):
    # Behind a load balancer, reads alternate between a node with `edge` and one without.
    server.script = [stores_answer("fast", "slow"), stores_answer("fast", "slow", "edge"),
                     stores_answer("fast", "slow")]
    assert set(glance.stores()) == {"fast", "slow", "edge"}
    assert len(server.seen) == 3   # the read that added edge was checked by one more


def test_nodes_that_agree_cost_two_reads_of_the_store_list(glance, server):
    server.script = [stores_answer("fast", "slow")] * 2
    assert set(glance.stores(refresh=True)) == {"fast", "slow"}
    assert len(server.seen) == 2
    assert set(glance.stores()) == {"fast", "slow"} and len(server.seen) == 2   # cached


# -- 401 and Keystone ---------------------------------------------------------------------------


def test_a_401_is_retried_once_with_a_new_token_by_keystoneauth_then_reported(glance, server):
    glance.conn.session.auth = Renewable()
    server.script = [error(401), error(401)]
    with pytest.raises(CredentialsRejected) as caught:
        glance.get_image(IMAGE)
    assert caught.value.status == 401
    assert [token for _, _, token in server.seen] == ["token-0", "token-1"]


def test_a_401_with_credentials_that_cannot_be_renewed_is_sent_once(glance, server):
    server.script = [error(401)]
    with pytest.raises(CredentialsRejected):
        glance.get_image(IMAGE)
    assert len(server.seen) == 1


@pytest.mark.parametrize("failure", [
    ks_exc.ConnectFailure("Unable to establish connection to http://keystone/v3"),
    ks_exc.ConnectTimeout("Request to http://keystone/v3/auth/tokens timed out"),
    ks_exc.DiscoveryFailure("Could not find versioned identity endpoints"),
    ks_exc.ServiceUnavailable("Keystone is restarting"),
])
def test_keystone_unreachable_is_not_reported_as_glance_unreachable(glance, server, failure):
    glance.conn.session.auth = Renewable(fail=failure)
    with pytest.raises(KeystoneUnavailable) as caught:
        glance.get_image(IMAGE)
    assert str(caught.value).startswith(("Keystone unreachable: ", "Keystone failed: "))
    assert server.seen == []   # Glance was not asked


def test_credentials_keystone_refuses_are_reported_as_such(glance, server):
    glance.conn.session.auth = Renewable(fail=ks_exc.Unauthorized("The request you have made "
                                                                  "requires authentication."))
    with pytest.raises(CredentialsRejected) as caught:
        glance.get_image(IMAGE)
    assert "Keystone refused imagesync's credentials" in str(caught.value)
    assert server.seen == []


# -- a dropped connection ----------------------------------------------------------------------


def test_an_import_whose_connection_drops_after_it_was_sent_may_have_reached_glance(
        glance, server):
    server.script = ["drop"]
    with pytest.raises(GlanceUnavailable) as caught:
        glance.copy_image(IMAGE, ["slow"])
    assert caught.value.status is None and caught.value.maybe_sent
    assert [(m, p) for m, p, _ in server.seen] == [("POST", f"/v2/images/{IMAGE}/import")]


def test_a_request_to_a_port_nobody_listens_on_never_reached_glance(glance, server):
    server.shutdown()
    server.server_close()
    glance.conn.session.session.close()   # no kept-alive connection from the discovery left
    with pytest.raises(GlanceUnavailable) as caught:
        glance.copy_image(IMAGE, ["slow"])
    assert caught.value.status is None and not caught.value.maybe_sent
    assert str(caught.value).startswith("Glance unreachable")


def test_a_refused_import_is_an_answer_not_an_exception(glance, server):
    server.script = [error(409)]
    status, message = glance.copy_image(IMAGE, ["slow"])
    assert status == 409 and "refused" in message


def test_the_reason_in_a_load_balancers_error_page_is_kept_without_its_markup(glance, server):
    page = b"<html><body><h1>503 Service Unavailable</h1>\nNo server is available to handle " \
           b"this request.\n</body></html>\n"
    server.script = [(503, {"Content-Type": "text/html"}, page)]
    with pytest.raises(GlanceUnavailable) as caught:
        glance.get_image(IMAGE)
    assert caught.value.message == "No server is available to handle this request."
