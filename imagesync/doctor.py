"""`imagesync doctor`: can imagesync work here? One Result per check, each with a fix.

Checks Glance (reachable, multi-store, copy-image, admin), RabbitMQ (the pool queue),
the ledger (notifications arriving, writable, private) and the policy. Reads only: it
declares nothing (the queue check is passive) and writes nothing. Results may carry
URLs: the CLI masks credentials before printing.
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
    stores = None
    glance, result = _connect(conf, glance_factory)
    if glance is not None:
        results, stores = glance_checks(glance, conf.imagesync.cloud)
        yield from results
    else:
        yield result
    yield queue_check(conf, queue_probe or probe_queue)
    yield events_check(conf.imagesync.ledger_path, now)
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
    """Reachable, multi-store with stores, copy-image enabled, admin; and the store ids."""
    from imagesync.glance import GlanceError, GlanceUnavailable

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
    if "copy-image" in methods:
        out.append(Result(OK, "copy-image enabled", f"import methods {', '.join(methods)}"))
    else:
        out.append(Result(FAIL, "copy-image enabled",
                          f"import methods {', '.join(methods) or 'none'}",
                          "add copy-image to [DEFAULT] enabled_import_methods in "
                          "glance-api.conf"))
    out.append(admin_check(glance, cloud, GlanceError, GlanceUnavailable))
    return out, stores


def admin_check(glance, cloud: str, error=None, unavailable=None) -> Result:
    """The credentials may copy: /v2/info/stores/detail is admin-only, as copy-image is."""
    if error is None:
        from imagesync.glance import GlanceError as error
        from imagesync.glance import GlanceUnavailable as unavailable
    title = "credentials may copy"
    try:
        glance._json("/info/stores/detail")
    except unavailable as exc:
        return Result(WARN, title, f"GET /v2/info/stores/detail: {exc}", "try again")
    except error as exc:
        if exc.status == 403:
            return Result(FAIL, title, "copy-image needs the admin role (GET "
                                       "/v2/info/stores/detail, admin-only, gave 403)",
                          f"give the user of cloud {cloud} the admin role, or change "
                          "Glance's copy_image policy")
        return Result(WARN, title, f"GET /v2/info/stores/detail: {exc}",
                      "copy-image needs the admin role by default")
    return Result(OK, title, "admin-only /v2/info/stores/detail readable (copy-image "
                             "needs the admin role by default)")


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


def events_check(ledger_path: str, now: float) -> Result:
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
