"""`imagesync doctor`: can imagesync work here? One Result per check, each with a fix.

Checks the coordination backend (when [coordination] backend_url is set: who is active),
Glance (reachable, multi-store, copy-image, may copy), RabbitMQ (the pool queue), the ledger
(notifications arriving, writable, private) and the policy. Changes nothing:
the queue check is passive, and the copy check sends a copy-image request Glance must
refuse (a store the image is already in). Results may carry URLs: the CLI masks
credentials before printing.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"
BACKLOG = 10_000  # messages waiting in the pool queue before it is worth a warning
COPY_IMAGE = "copy-image"
MAY_COPY = "credentials may copy"
TITLES = ("configuration", "coordination", "Glance reachable", "multi-store",
          "copy-image enabled", MAY_COPY, "notification queue", "notifications arriving",
          "policy valid", "ledger writable")

# -- "credentials may copy": ask Glance the real question ---------------------------------
# Glance 33's import handler (glance/api/v2/images.py, ImagesController.import_image) checks,
# in this order: the quota (413), the image (404), its status and formats (409), the
# copy_image policy (403), the import lock (409; a stale one is broken), the store names
# (409), and only then whether the image is already in one of the target stores (400 "Image
# is already present at store ..."). So a copy-image request for a store the image is already in is
# refused before any task exists: 400 for credentials the policy lets copy, 403 for the rest.
# Images whose lock is set are never asked about (the lock check could break a stale lock).

PROBE_LISTING = ("/images?limit=20&status=active&visibility=all"
                 "&sort_key=created_at&sort_dir=asc")  # the oldest images: long settled
PROBE_TRIES = 3  # images asked about at most (another may be deleted or locked meanwhile)


@dataclasses.dataclass(frozen=True)
class Result:
    status: str  # OK, WARN or FAIL
    title: str
    detail: str
    hint: str | None = None


def run(conf, now: float, glance_factory: Callable | None = None,
        queue_probe: Callable | None = None) -> Iterator[Result]:
    """Every check in order; Glance checks are left out when Glance cannot be reached."""
    files = list(conf.config_file or ())
    yield Result(OK if files else WARN, "configuration",
                 f"read {', '.join(files)}" if files else "no configuration file: defaults only",
                 "pass --config-file PATH, or create /etc/imagesync/imagesync.conf")
    view = ask_members(conf) if conf.coordination.backend_url else None
    yield coordination_check(view, now)
    stores = None
    glance, result = _connect(conf, glance_factory)
    if glance is not None:
        results, stores = glance_checks(glance, conf.imagesync.cloud)
        yield from results
    else:
        yield result
    yield queue_check(conf, queue_probe or probe_queue)
    yield events_check(conf.imagesync.ledger_path, now, elsewhere=_active_elsewhere(view))
    yield policy_check(conf.imagesync.policy_file, stores)
    yield ledger_check(conf.imagesync.ledger_path)


def _connect(conf, factory):
    from imagesync.glance import Glance

    c = conf.imagesync
    try:
        factory = factory or (lambda: Glance.connect(c.cloud, c.clouds_file, timeout=10))
        return factory(), None
    except Exception as exc:  # openstacksdk config errors have no common base
        return None, Result(FAIL, "Glance reachable", f"cannot use cloud {c.cloud!r}: {exc}",
                            "name a clouds.yaml entry in [imagesync] cloud (and clouds_file)")


def glance_checks(glance, cloud: str) -> tuple[list[Result], set[str] | None]:
    """Reachable, multi-store with stores, copy-image enabled, may copy; and the store ids."""
    from imagesync.glance import GlanceError

    out: list[Result] = []
    try:
        methods = glance.import_methods()
    except GlanceError as exc:
        hint = ("check the endpoint, TLS and credentials of cloud " + cloud)
        return [Result(FAIL, "Glance reachable", str(exc), hint)], None
    try:
        endpoint = glance.conn.image.get_endpoint()
    except Exception:  # only for the message
        endpoint = "endpoint unknown"
    out.append(Result(OK, "Glance reachable", f"{endpoint} (cloud {cloud})"))
    stores = None
    try:
        body = glance._json("/info/stores")
        stores = {s["id"] for s in body.get("stores", [])}
        out.append(Result(OK if stores else FAIL, "multi-store",
                          f"stores {', '.join(sorted(stores))}" if stores else "no stores listed",
                          "set enabled_backends in glance-api.conf"))
    except GlanceError as exc:
        out.append(Result(FAIL, "multi-store", f"GET /v2/info/stores: {exc}",
                          "enable multi-store: enabled_backends in glance-api.conf "
                          "([DEFAULT] enabled_backends = NAME:TYPE, ...), then restart it"))
    enabled = COPY_IMAGE in methods
    if enabled:
        out.append(Result(OK, "copy-image enabled", f"import methods {', '.join(methods)}"))
    else:
        out.append(Result(FAIL, "copy-image enabled",
                          f"import methods {', '.join(methods) or 'none'}",
                          "add copy-image to [DEFAULT] enabled_import_methods in "
                          "glance-api.conf"))
    out.append(copy_check(glance, cloud, stores) if enabled else
               Result(WARN, MAY_COPY, "not checked: copy-image is not enabled",
                      "enable copy-image, then run doctor again"))
    return out, stores


def copy_check(glance, cloud: str, stores: set[str] | None = None) -> Result:
    """May these credentials copy? A copy-image request Glance must refuse either way says."""
    from imagesync.glance import GlanceError, GlanceUnavailable
    from imagesync.model import Image

    hint = (f"give the user of cloud {cloud} the admin role (Glance's default copy_image "
            "policy is role:admin), or change Glance's copy_image policy")
    try:
        body = glance._json(PROBE_LISTING)
    except GlanceUnavailable as exc:
        return Result(WARN, MAY_COPY, f"cannot tell: GET /v2/images: {exc}", "try again")
    except GlanceError as exc:
        if exc.status == 403:
            return Result(FAIL, MAY_COPY, "copy-image needs the admin role, and these "
                                          "credentials may not even list images (GET "
                                          "/v2/images gave 403)", hint)
        return Result(WARN, MAY_COPY, f"cannot tell: GET /v2/images: {exc}", "try again")
    images = [Image.from_api(i) for i in body.get("images", []) if i.get("id")]
    candidates = list(_probe_targets(images, stores))
    if not candidates:
        return Result(WARN, MAY_COPY, "cannot tell: these credentials see no active image in "
                                      "a store to ask Glance about",
                      "run doctor again once an image exists: it asks Glance to copy an image "
                      "to a store the image is already in, which Glance refuses with 400 to "
                      "credentials that may copy and with 403 to the others")
    last = None
    for image, store in candidates[:PROBE_TRIES]:
        try:
            status, message = glance.copy_image(image.id, [store])
        except GlanceError as exc:  # no real answer: no connection, 5xx, 401, 429
            status, message = exc.status, exc.message
        verdict = copy_verdict(status, message, image.id, store, hint)
        if verdict is not None:
            return verdict
        last = f"HTTP {status}: {message}" if status else message
    return Result(WARN, MAY_COPY, f"cannot tell: Glance answered {last} (the last of "
                                  f"{min(len(candidates), PROBE_TRIES)} image(s) asked about)",
                  "try again")


def _probe_targets(images, stores: set[str] | None):
    """(image, a store it is in) for each active, unlocked image in a store Glance lists."""
    for image in images:
        present = image.stores & stores if stores is not None else image.stores
        if image.status == "active" and not image.import_task and present:
            yield image, min(present)


def copy_verdict(status: int | None, message: str, image_id: str, store: str,
                 hint: str) -> Result | None:
    """What Glance's answer to the probe says; None: ask about another image."""
    asked = f"a copy-image request for image {image_id} to store {store}, which it is in"
    if status == 400 and "already present" in message:
        return Result(OK, MAY_COPY, f"Glance's copy_image policy allows it: {asked}, passed "
                                    "the policy and was refused with 400 'already present' "
                                    "(nothing copied)")
    if status == 403:
        return Result(FAIL, MAY_COPY, f"copy-image needs the admin role: Glance refused {asked}, "
                                      f"with 403 ({message})", hint)
    if status == 413:
        return Result(WARN, MAY_COPY, f"cannot tell: Glance refused {asked}, for quota (413: "
                                      f"{message}), so every copy is refused too",
                      "raise the image_size_total limit of the credentials' project")
    if status == 202:
        return Result(WARN, MAY_COPY, f"these credentials may copy, but Glance accepted {asked}, "
                                      "with 202: it imports the image again",
                      "report it: Glance should refuse a copy to a store the image is in")
    if status in (404, 409):  # deleted or locked meanwhile, or a store this node lacks
        return None
    return Result(WARN, MAY_COPY, f"cannot tell: Glance answered {asked}, with "
                                  f"{f'HTTP {status}: ' if status else ''}{message}", "try again")


# -- coordination: which controller's daemon is active ------------------------------------


@dataclasses.dataclass(frozen=True)
class Members:
    """What the coordination backend says, as `status` and doctor show it."""
    backend: str               # the URL, password masked
    member: str                # this node's member id
    found: dict | None         # member id -> {"role", "since"}; None: backend not reached
    error: str | None = None   # why not

    def role(self) -> str | None:
        caps = (self.found or {}).get(self.member)
        return caps.get("role") if isinstance(caps, dict) else None

    def active(self) -> list[tuple[str, float | None]]:
        """(member, since) of each member that says it is active, the latest last."""
        out = [(m, c.get("since")) for m, c in (self.found or {}).items()
               if isinstance(c, dict) and c.get("role") == "active"]
        return sorted(out, key=lambda ms: (ms[1] if isinstance(ms[1], (int, float)) else 0))


ASK_TIMEOUT = 5.0   # seconds `status` and doctor wait for the coordination backend


def ask_members(conf, lookup: Callable | None = None) -> Members:
    """Ask [coordination] backend_url for the members and their roles; never raises, and
    answers within ASK_TIMEOUT seconds. A backend no daemon has joined yet answers "no
    group": no members, not an error."""
    from imagesync import coordination

    url = conf.coordination.backend_url
    member = conf.coordination.member_id or coordination.default_member_id()
    backend, password = coordination.redact(url), _password(url)

    def masked(text: str) -> str:
        return text.replace(password, "***") if password else text

    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # via futurist
    try:
        found = _within(ASK_TIMEOUT, lookup or coordination.members, url)
    except TimeoutError as exc:
        return Members(backend, member, None, masked(str(exc)))
    except Exception as exc:  # noqa: BLE001 - tooz, redis and etcd errors alike
        if type(exc).__name__ == "GroupNotCreated":
            return Members(backend, member, {})
        return Members(backend, member, None, masked(_first_line(exc)))
    return Members(backend, member, found)


def _first_line(exc: BaseException) -> str:
    """"Type: first line", the line from the exception's cause when it has no text of its
    own (tooz's etcd driver raises ConnectionFailedError() from requests' error)."""
    said: BaseException | None = exc
    while said is not None and not str(said).strip():
        said = said.__cause__ or said.__context__
    text = (str(said).strip().splitlines() or [""])[0][:300] if said is not None else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _within(timeout: float, lookup: Callable, url: str):
    """lookup(url) in a thread of its own, waited for `timeout` seconds: tooz's redis driver
    retries a refused connection or a wrong password 15 times (about a minute), and a host
    that drops packets would hold the CLI longer. On time out, TimeoutError says the last
    thing tooz logged (its retries name the cause)."""
    import logging
    import threading

    answer: dict = {}
    done = threading.Event()   # not Thread.join(): see imagesync.coordination.Lease
    heard: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(record.getMessage())

    def call() -> None:
        try:
            answer["found"] = lookup(url)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            answer["error"] = exc
        finally:
            done.set()

    tooz_log, handler = logging.getLogger("tooz"), Heard(logging.DEBUG)
    level, propagate = tooz_log.level, tooz_log.propagate
    tooz_log.addHandler(handler)
    tooz_log.setLevel(logging.DEBUG)
    tooz_log.propagate = False   # its retries are ours to summarise, not to print
    try:
        threading.Thread(target=call, name="imagesync-members", daemon=True).start()
        if not done.wait(timeout):
            last = f"; tooz said: {heard[-1].splitlines()[0][:200]}" if heard else ""
            raise TimeoutError(f"no answer within {timeout:g} s{last}")
    finally:
        tooz_log.removeHandler(handler)
        tooz_log.setLevel(level)
        tooz_log.propagate = propagate
    if "error" in answer:
        raise answer["error"]
    return answer["found"]


def _password(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def coordination_check(view: Members | None, now: float) -> Result:
    from imagesync import output

    title = "coordination"
    if view is None:
        return Result(OK, title, "not configured: this daemon works alone ([coordination] "
                                 "backend_url is unset)")
    if view.found is None:
        return Result(FAIL, title, f"cannot reach {view.backend}: {view.error}",
                      "check [coordination] backend_url (host, port, password, sentinel "
                      "name) and that the backend answers from this host")
    role = view.role() or "not a member: its daemon is stopped or cannot reach the backend"
    mine = f"this node ({view.member}) {role}"
    active = view.active()
    if not active:
        others = ", ".join(f"{m} {c.get('role') if isinstance(c, dict) else None}"
                           for m, c in sorted(view.found.items())) or "none"
        return Result(WARN, title, f"no member is active on {view.backend} (members: "
                                   f"{others}); {mine}",
                      "start imagesync-daemon with this backend_url on the controllers; a "
                      "standby takes over within [coordination] lease seconds of a failover")
    member, since = active[-1]
    when = (f" since {output.iso(since)} ({output.ago(since, now)})"
            if isinstance(since, (int, float)) else "")
    detail = f"active: {member}{when}; {mine}"
    if len(active) > 1:
        return Result(WARN, title, f"{detail}; {len(active)} members say they are active: "
                                   f"{', '.join(m for m, _ in active)}",
                      "a claim lost a moment ago shows until its holder publishes standby; if "
                      "it lasts, give each controller its own [coordination] member_id")
    return Result(OK, title, detail)


def _active_elsewhere(view: Members | None) -> str | None:
    """When another member is active: "this node (ctl2) is standby; ctl1 is active"."""
    if view is None or view.found is None or not view.active():
        return None
    member = view.active()[-1][0]
    if member == view.member:
        return None
    return f"this node ({view.member}) is {view.role() or 'not a member'}; {member} is active"


def queue_name(conf) -> str:
    """The queue the daemon consumes: its pool's, or with no pool the topic's own."""
    n = conf.notifications
    return n.pool or f"{n.topic}.info"


def probe_queue(conf) -> tuple[str, int, int]:
    """Passively declare the pool queue: (where, messages, consumers). Raises on failure."""
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import kombu
    import oslo_messaging

    transport = oslo_messaging.get_notification_transport(conf)  # registers the options
    transport.cleanup()
    url = conf.oslo_messaging_notifications.transport_url or conf.transport_url
    parsed = oslo_messaging.TransportURL.parse(conf, url)
    rabbit = conf.oslo_messaging_rabbit
    ssl: dict | bool = False
    if rabbit.ssl:
        ssl = {k: v for k, v in (("ca_certs", rabbit.ssl_ca_file),
                                 ("certfile", rabbit.ssl_cert_file),
                                 ("keyfile", rabbit.ssl_key_file)) if v} or True
    error: Exception | None = None
    for host in parsed.hosts or [None]:
        args = dict(hostname=host.hostname, port=host.port, userid=host.username,
                    password=host.password) if host else {}
        args = {k: v for k, v in args.items() if v}
        try:
            with kombu.Connection(transport="pyamqp", virtual_host=parsed.virtual_host or "/",
                                  ssl=ssl, connect_timeout=5, **args) as connection:
                connection.connect()
                where = connection.as_uri()  # password masked by kombu
                ok = connection.channel().queue_declare(queue=queue_name(conf), passive=True)
                return where, ok.message_count, ok.consumer_count
        except Exception as exc:  # try the next host; report the last failure
            at = f"{args.get('hostname', 'localhost')}:{args.get('port', 5672)}"
            error = ConnectionError(f"{at}: {type(exc).__name__}: {exc}")
    raise error or ConnectionError("no RabbitMQ host in transport_url")


def queue_check(conf, probe) -> Result:
    pool, title = queue_name(conf), "notification queue"
    try:
        where, messages, consumers = probe(conf)
    except Exception as exc:
        text = str(exc)
        if "NOT_FOUND" in text or "NotFound" in text:
            return Result(FAIL, title, f"no queue {pool!r}",
                          "start the daemon once: it declares the queue and binds it to "
                          f"exchange {conf.notifications.exchange}, topic "
                          f"{conf.notifications.topic}")
        return Result(FAIL, title, f"cannot reach RabbitMQ: {text}",
                      "check transport_url ([oslo_messaging_notifications] or [DEFAULT]) "
                      "and [oslo_messaging_rabbit] ssl options")
    detail = f"queue {pool!r} on {where}: {messages} message(s) waiting, " \
             f"{consumers} consumer(s)"
    if consumers == 0:
        return Result(WARN, title, detail, "no consumer: the daemon is not listening")
    if messages > BACKLOG:
        return Result(WARN, title, detail, "a backlog: the daemon cannot keep up, or is stuck")
    return Result(OK, title, detail)


def events_check(ledger_path: str, now: float, elsewhere: str | None = None) -> Result:
    """The ledger's last notification. `elsewhere`: another member is active (this node's
    ledger hears nothing meanwhile), so the check belongs to that member's doctor."""
    from imagesync import ledger, output

    title = "notifications arriving"
    hint = ("turn Glance's notifications on: glance-api.conf [oslo_messaging_notifications] "
            "driver = messagingv2 with the same RabbitMQ, and topics including notifications")
    try:
        conn = ledger.open_readonly(ledger_path)
        daemon = ledger.read_daemon(conn)
        conn.close()
    except ledger.LedgerError as exc:
        return Result(WARN, title, f"cannot tell: {exc}", "start the daemon")
    if elsewhere:
        last = (f"last one here {output.ago(daemon['last_event_at'], now)}"
                if daemon and daemon["last_event_at"] is not None else "none here yet")
        return Result(OK, title, f"not this node's to hear: {elsewhere} and records them "
                                 f"(imagesync doctor there checks them); {last}")
    if not daemon or daemon["last_event_at"] is None:
        return Result(WARN, title, "the daemon has recorded no notification yet", hint)
    return Result(OK, title, f"last one {output.ago(daemon['last_event_at'], now)} "
                             f"({daemon['events_total']} in all)")


def policy_check(path: str, stores: set[str] | None) -> Result:
    from imagesync.policy import PolicyError, load_policy

    try:
        policy = load_policy(path, stores)
    except PolicyError as exc:
        more = len(exc.problems) - 1
        return Result(FAIL, "policy valid", str(exc.problems[0]) + (
            f" (and {more} more)" if more else ""), f"imagesync policy check {path}")
    against = "the live stores" if stores is not None else "nothing (Glance not reached)"
    warned = f", {len(policy.warnings)} warning(s)" if policy.warnings else ""
    return Result(WARN if policy.warnings or stores is None else OK, "policy valid",
                  f"{path}: {len(policy.rules)} rule(s){warned}; store names checked against "
                  f"{against}", f"imagesync policy check {path}")


def ledger_check(path: str) -> Result:
    title, file, folder = "ledger writable", Path(path), Path(path).parent
    if not folder.is_dir():
        return Result(FAIL, title, f"no directory {folder}",
                      f"create it for the daemon's user: install -d -m 0700 {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        return Result(FAIL, title, f"{folder} is not writable by this user",
                      "run as the daemon's user, or fix the directory's owner")
    if not file.exists():
        return Result(WARN, title, f"no ledger yet at {file}", "the daemon creates it at start")
    info = file.stat()
    if not os.access(file, os.R_OK | os.W_OK):
        return Result(FAIL, title, f"{file} is not writable by this user",
                      "run as the daemon's user")
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o600:
        return Result(WARN, title, f"{file} has mode {mode:04o}, not 0600", f"chmod 600 {file}")
    if info.st_uid != os.geteuid():
        return Result(WARN, title, f"{file} belongs to uid {info.st_uid}, not you "
                                   f"({os.geteuid()})", "run imagesync as the daemon's user")
    return Result(OK, title, f"{file} (mode 0600, yours)")
