"""The operator CLI: `imagesync COMMAND`. A thin skin over the library.

Imports stay inside commands: `imagesync status` must answer without loading
openstacksdk or oslo.messaging. Reads go through the ledger's read side on a
read-only connection; `retry` and `sync` only queue requests for the daemon,
which alone sends imports. Rows come from imagesync.report, formats from
imagesync.output.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import click

from imagesync import output

clock = time.time  # what "now" is; tests replace it
STATES = ("pending", "in_flight", "done", "retrying", "failed", "cancelled")
UNSETTLED = ("pending", "in_flight", "retrying", "failed")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


class Env:
    """What commands share: the config files, loaded on first use, and the ways in."""

    def __init__(self, config_files: tuple[str, ...], config_dirs: tuple[str, ...] = ()):
        self.config_files = list(config_files)
        self.config_dirs = list(config_dirs)
        self._conf = None

    @property
    def conf(self):
        """The options, read as the daemon reads them: the files (default
        /etc/imagesync/imagesync.conf), then each --config-dir's *.conf files, sorted (by
        default oslo.config's imagesync.conf.d and imagesync-daemon.conf.d directories)."""
        if self._conf is None:
            from oslo_config import cfg

            from imagesync import conf as conf_mod

            argv = [arg for d in self.config_dirs for arg in ("--config-dir", d)]
            try:
                self._conf = conf_mod.load(argv, config_files=self.config_files or None,
                                           prog="imagesync-daemon")
            except cfg.Error as exc:
                raise click.ClickException(f"configuration error: {exc}") from exc
        return self._conf

    @property
    def ledger_path(self) -> str:
        return self.conf.imagesync.ledger_path

    def readonly(self):
        from imagesync.ledger import LedgerError, open_readonly

        try:
            return open_readonly(self.ledger_path)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc

    def glance(self):
        from imagesync.glance import Glance
        from imagesync.log import redact

        c = self.conf.imagesync
        try:
            return Glance.connect(c.cloud, c.clouds_file, timeout=30)
        except Exception as exc:  # openstacksdk's config errors have no common base
            raise click.ClickException(redact(
                f"cannot set up Glance from cloud {c.cloud!r} "
                f"({c.clouds_file or 'clouds.yaml search path'}): {exc}")) from exc

    def stores(self, glance):
        from imagesync.glance import GlanceError
        from imagesync.log import redact

        try:
            return glance.stores(refresh=True)
        except GlanceError as exc:
            raise click.ClickException(redact(f"Glance: {exc}")) from exc

    def policy(self, path: str | None, known_stores):
        """The policy file (default [imagesync] policy_file), validated; exits 1 on errors."""
        from imagesync.policy import PolicyError, load_policy

        try:
            return load_policy(path or self.conf.imagesync.policy_file, known_stores)
        except PolicyError as exc:
            click.echo(str(exc), err=True)
            raise click.ClickException("the policy is invalid") from exc


def output_options(fn):
    """-f/--format and -c/--column, the same on every listing (like the openstack client)."""
    fn = click.option("-c", "--column", "columns", multiple=True, metavar="COLUMN",
                      help="Show only this column; repeat for more (any format).")(fn)
    return click.option("-f", "--format", "fmt", type=click.Choice(output.FORMATS),
                        default="table", show_default=True,
                        help="table for people, json or value for scripts (value: one row "
                             "per line, fields separated by spaces).")(fn)


def _echo_rows(columns, rows, fmt: str, selected, now: float, empty: str) -> None:
    cols = _columns(columns, selected, fmt)
    if not rows and fmt == "table":
        if empty:
            click.echo(empty)
    elif rows or fmt == "json":
        click.echo(output.render(cols, rows, fmt, now))


def _columns(columns, selected, fmt):
    try:
        return output.select(columns, selected, fmt)
    except output.OutputError as exc:
        raise click.BadParameter(str(exc), param_hint="'-c'") from exc


def _running(pid: int | None, started_at: float | None) -> bool | None:
    """Is the daemon that wrote `pid` at `started_at` alive here? None when we cannot tell.

    oslo.service retitles its processes, so the name proves nothing: a live process with
    that pid counts only if it began before the daemon recorded itself (pid reuse).
    """
    if not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return started_at is None or began <= started_at + 2


def _resolve(conn, image: str) -> str | None:
    """An image id from an id or a name the ledger knows; None when the ledger has neither."""
    from imagesync import ledger

    if ledger.read_image(conn, image):
        return image
    ids = ledger.find_image_ids(conn, image)
    if len(ids) > 1:
        raise click.ClickException(f"{len(ids)} images are named {image!r} "
                                   f"({', '.join(ids)}): give the id")
    return ids[0] if ids else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imagesync")
@click.option("--config-file", "config_files", multiple=True, metavar="PATH",
              type=click.Path(exists=True, dir_okay=False),
              help="Read options from this file (repeatable; default "
                   "/etc/imagesync/imagesync.conf when it exists), like the daemon.")
@click.option("--config-dir", "config_dirs", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False),
              help="Then read every *.conf file in this directory, in sorted order "
                   "(repeatable), like the daemon's --config-dir.")
@click.pass_context
def main(ctx: click.Context, config_files: tuple[str, ...],
         config_dirs: tuple[str, ...]) -> None:
    """imagesync: keep Glance images in the stores your policy names.

    Example: imagesync --config-file /etc/imagesync/imagesync.conf status
    """
    ctx.obj = Env(config_files, config_dirs)


# -- status -------------------------------------------------------------------------------


@main.command(short_help="Copies per store, one image, or a list of copies.")
@click.argument("image", required=False)
@click.option("--failed", is_flag=True, help="List failed copies (same as --state failed).")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="List copies in this state (repeatable). Default with --project or "
                   "--store: every state but done and cancelled.")
@click.option("--project", metavar="ID", help="List copies of images this project owns.")
@click.option("--store", metavar="NAME", help="List copies to this store.")
@output_options
@click.pass_obj
def status(env: Env, image, failed, states, project, store, fmt, columns) -> None:
    """What the ledger says: copies per store, one IMAGE (id or name), or a list of copies.

    Reads the ledger read-only: it works while the daemon is down and never blocks it.
    With [coordination] backend_url set, the summary first says which controller's daemon
    is active and this node's role; anywhere but on the active one, the ledger shown is the
    last known view (a daemon writes it only while active).

    \b
    Examples:
      imagesync status                   copies per store, and the daemon's last news
      imagesync status IMAGE             each store of one image: state, error, next try
      imagesync status --failed          every failed copy, with its error
      imagesync status --store edge -f json -c image_id -c state
    """
    from imagesync import ledger, report

    conn = env.readonly()
    now = clock()
    wanted = set(states) | ({"failed"} if failed else set())
    if image:
        image_id = _resolve(conn, image)
        row = ledger.read_image(conn, image_id) if image_id else None
        if row is None:
            raise click.ClickException(
                f"the ledger has no image {image!r} (the daemon has not looked at it; "
                f"`imagesync explain {image}` asks Glance)")
        copies = [report.copy_row(c) for c in ledger.read_copies(
            conn, image_id=image_id, states=sorted(wanted) or None, store=store)]
        cols = _columns(report.IMAGE_COPY_COLUMNS, columns, fmt)
        if fmt == "json":
            click.echo(output.dumps({"image": report.image_record(row),
                                     "copies": output.records(cols, copies)}))
            return
        if fmt == "table":
            click.echo("\n".join(report.image_lines(row, now)))
        _echo_rows(report.IMAGE_COPY_COLUMNS, copies, fmt, columns, now,
                   "no copies match" if wanted or store else
                   "no copies recorded: no rule wants this image in a store it lacks")
    elif wanted or project or store:
        copies = [report.copy_row(c) for c in ledger.read_copies(
            conn, states=sorted(wanted or UNSETTLED), project=project, store=store)]
        _echo_rows(report.COPY_COLUMNS, copies, fmt, columns, now, "no copies match")
    else:
        counts = [report.store_row(r) for r in ledger.read_store_counts(conn)]
        daemon = ledger.read_daemon(conn)
        running = _running(daemon["pid"], daemon["started_at"]) if daemon else None
        _columns(report.STORE_COLUMNS, columns, fmt)  # a wrong -c fails before any lookup
        view = _members(env) if fmt != "value" else None
        if fmt == "json":
            cols = _columns(report.STORE_COLUMNS, columns, fmt)
            click.echo(output.dumps({
                "daemon": report.daemon_record(daemon, running),
                "stores": output.records(cols, counts),
                "coordination": view and report.coordination_record(
                    view.backend, view.member, view.found, view.error)}))
            return
        if view is not None:
            click.echo("\n".join(report.coordination_lines(view.backend, view.member,
                                                           view.found, view.error, now)))
        _echo_rows(report.STORE_COLUMNS, counts, fmt, columns, now, "no copies recorded yet")
        if fmt == "table":
            click.echo(report.daemon_text(daemon, running, now))


def _members(env: Env):
    """What [coordination] backend_url says of the members (doctor.Members), or None when
    it is unset: one controller, and nothing to say."""
    if not env.conf.coordination.backend_url:
        return None
    from imagesync import doctor

    return doctor.ask_members(env.conf)


# -- retry and sync: requests the daemon picks up -----------------------------------------


def _queue(env: Env, action: str, image_id: str | None) -> int:
    from imagesync.ledger import Ledger, LedgerError

    try:
        ledger = Ledger(env.ledger_path)
    except LedgerError as exc:
        raise click.ClickException(f"{exc} (run imagesync as the daemon's user)") from exc
    try:
        return ledger.add_request(action, image_id, clock())
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        ledger.close()


def _when_daemon(conn) -> str:
    from imagesync import ledger

    daemon = ledger.read_daemon(conn)
    if daemon is None or _running(daemon["pid"], daemon["started_at"]) is False:
        return "the daemon is not running: it picks the request up when it starts"
    return "the daemon picks it up within a second"


def _wait(env: Env, request_id: int, timeout: float = 10.0) -> None:
    from imagesync import ledger

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = env.readonly()
        try:
            req = ledger.read_request(conn, request_id)
        finally:
            conn.close()
        if req and req["done_at"]:
            click.echo(f"the daemon took it: {req['result']}")
            return
        time.sleep(0.1)
    raise click.ClickException(f"the daemon did not take request {request_id} within "
                               f"{timeout:.0f} s (is it running? imagesync status)")


@main.command(short_help="Queue a retry of failed copies for the daemon.")
@click.argument("image", required=False)
@click.option("--all-failed", is_flag=True, help="Retry every failed copy of every image.")
@click.option("--now", is_flag=True,
              help="Also bring forward copies waiting to retry (keeping their attempts).")
@click.option("--wait", is_flag=True, help="Wait (up to 10 s) until the daemon has taken it.")
@click.pass_obj
def retry(env: Env, image, all_failed, now, wait) -> None:
    """Queue a retry of the failed copies of IMAGE (id or name), or of all failed copies.

    The daemon sets them back to pending with their attempts reset and copies them again.
    With --now, copies waiting out a backoff (retrying) are made due at once too.

    \b
    Examples:
      imagesync retry 0b8e5d1c-8f1a-4c1e-9a58-3a5b7e3f2c11
      imagesync retry --all-failed --wait
      imagesync retry --all-failed --now
    """
    from imagesync import ledger

    if bool(image) == bool(all_failed):
        raise click.UsageError("give either IMAGE or --all-failed")
    conn = env.readonly()
    image_id = None
    if image:
        image_id = _resolve(conn, image)
        if image_id is None:
            raise click.ClickException(f"the ledger has no image {image!r}")
    failed = ledger.read_copies(conn, image_id=image_id,
                                states=["failed", "retrying"] if now else ["failed"])
    if not failed:
        click.echo(f"no failed copies of {image}: nothing to retry (imagesync sync {image} "
                   "makes the daemon look at it now)" if image else
                   "no failed copies: nothing to retry")
        return
    what = f"of {image}" if image else f"of {len({c['image_id'] for c in failed})} image(s)"
    request_id = _queue(env, ledger.RETRY_NOW if now else ledger.RETRY, image_id)
    stores = sorted({c["store"] for c in failed})
    click.echo(f"queued a retry of {len(failed)} {'' if now else 'failed '}"
               f"cop{'y' if len(failed) == 1 else 'ies'}"
               f" {what} ({', '.join(stores)}); {_when_daemon(conn)}")
    if wait:
        _wait(env, request_id)


@main.command(short_help="Make the daemon look at an image now.")
@click.argument("image")
@click.option("--wait", is_flag=True, help="Wait (up to 10 s) until the daemon has taken it.")
@click.pass_obj
def sync(env: Env, image, wait) -> None:
    """Make the daemon re-read IMAGE (id, or a name the ledger knows) from Glance now.

    It then plans the image's copies as for a notification: useful after fixing a store,
    or for an image whose notifications were lost.

    Example: imagesync sync 0b8e5d1c-8f1a-4c1e-9a58-3a5b7e3f2c11
    """
    conn = env.readonly()
    image_id = _resolve(conn, image)
    if image_id is None:
        if not _UUID.match(image):
            raise click.ClickException(f"{image!r} is not an image id, and the ledger has no "
                                       "image of that name")
        image_id = image
    request_id = _queue(env, "sync", image_id)
    click.echo(f"queued a sync of {image_id}; {_when_daemon(conn)}")
    if wait:
        _wait(env, request_id)


# -- plan and explain: the policy against the live Glance ---------------------------------


def _policy_drift(env: Env, policy, explicit: bool) -> None:
    """Say so when the daemon runs another version of the policy than the file shows."""
    import sqlite3

    from imagesync import ledger
    from imagesync.ledger import LedgerError, open_readonly

    if explicit:
        return
    try:
        conn = open_readonly(env.ledger_path)
        saved = ledger.read_policy(conn)
    except (LedgerError, sqlite3.Error):
        return
    if saved and saved["text"] != policy.text:
        loaded = output.ago(saved["saved_at"], clock())
        click.echo(f"note: the daemon runs the policy it loaded {loaded}; {policy.source} has "
                   "changed since (reload the daemon to use it)", err=True)


def _optional_ledger(env: Env, consequence: str):
    """A read-only ledger connection, or None with a note on stderr saying what is lost."""
    from imagesync.ledger import LedgerError, open_readonly

    try:
        return open_readonly(env.ledger_path)
    except LedgerError as exc:
        click.echo(f"note: {exc}; {consequence}", err=True)
        return None


def _glance_image(glance, conn, image: str):
    """The image from Glance by id, or by a name the ledger knows; exits 1 when neither."""
    found = glance.get_image(image)
    if found is None and conn is not None and (image_id := _resolve(conn, image)):
        found = glance.get_image(image_id)
    if found is None:
        raise click.ClickException(f"Glance has no image {image!r}")
    return found


def _note_resume(gone: str, marker: str | None, error: str) -> None:
    click.echo(f"note: image {gone} vanished while Glance listed it ({error}); the listing "
               f"goes on after {marker or 'the first page'}", err=True)


@main.command(short_help="Dry run: missing copies and the bytes to move.")
@click.argument("images", nargs=-1, metavar="[IMAGE]...")
@click.option("--project", metavar="ID", help="Only images this project owns.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False),
              help="Plan with this policy file instead of [imagesync] policy_file.")
@output_options
@click.pass_obj
def plan(env: Env, images, project, policy_file, fmt, columns) -> None:
    """Dry run: the copies the policy wants that Glance lacks, with the bytes to move.

    Asks the live Glance and the policy, imports nothing. One row per missing copy: the
    rule that wants it, its size, what the ledger says of it, and what the daemon does
    with it: copy; importing (another import is on it); held (it failed: not copied again
    until `imagesync retry`); skip (useless: non-raw to cinder/rbd, read-only store).

    \b
    Examples:
      imagesync plan                                   every image
      imagesync plan --policy new-policy.yaml          what a new policy would copy
      imagesync plan IMAGE -f json
    """
    from imagesync import ledger, report
    from imagesync.glance import GlanceError
    from imagesync.log import redact
    from imagesync.reconcile import every_image, fill_in_stores

    glance = env.glance()
    stores = env.stores(glance)
    policy = env.policy(policy_file, stores)
    _policy_drift(env, policy, bool(policy_file))
    conn = _optional_ledger(env, "the ledger column stays empty")
    try:
        if images:
            found = [_glance_image(glance, conn, name) for name in images]
        else:
            seen: dict = {}
            for hidden in (False, True):
                for page in every_image(glance, env.conf.reconcile.page_size, hidden,
                                        _note_resume):
                    seen.update((i.id, i) for i in fill_in_stores(glance, page, strict=True))
            found = list(seen.values())
    except GlanceError as exc:
        raise click.ClickException(redact(f"Glance: {exc}")) from exc
    found = sorted((i for i in found if project is None or i.owner == project),
                   key=lambda i: (i.name or "", i.id))
    states = ledger.read_copy_states(conn, [i.id for i in found]) if conn else {}
    now = clock()
    rows = [r for image in found for r in report.plan_rows(image, stores, policy, states, now)]
    totals = report.plan_totals(rows, len(found), sum(i.status != "active" for i in found))
    if fmt == "json":
        cols = _columns(report.PLAN_COLUMNS, columns, fmt)
        click.echo(output.dumps({"copies": output.records(cols, rows), "totals": totals}))
        return
    _echo_rows(report.PLAN_COLUMNS, rows, fmt, columns, now, "")
    if fmt == "table":
        click.echo(report.plan_text(totals))


@main.command(short_help="Why an image belongs where: rules, stores, ledger.")
@click.argument("image")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False),
              help="Explain with this policy file instead of [imagesync] policy_file.")
@output_options
@click.pass_obj
def explain(env: Env, image, policy_file, fmt, columns) -> None:
    """Why IMAGE (id, or a name the ledger knows) should be where: every rule, and the ledger.

    For each rule: matched or not, and which matcher failed; then the stores the policy
    wants against the stores Glance shows, and what the ledger says of each copy.
    -f and -c apply to the rule table.

    Example: imagesync explain 0b8e5d1c-8f1a-4c1e-9a58-3a5b7e3f2c11
    """
    from imagesync import ledger, planner, report
    from imagesync.glance import GlanceError, with_members
    from imagesync.log import redact

    glance = env.glance()
    stores = env.stores(glance)
    policy = env.policy(policy_file, stores)
    _policy_drift(env, policy, bool(policy_file))
    conn = _optional_ledger(env, "the ledger's view is left out")
    try:
        found = _glance_image(glance, conn, image)
    except GlanceError as exc:
        raise click.ClickException(redact(f"Glance: {exc}")) from exc
    live = [s.id for s in stores.values() if not s.read_only]
    now = clock()
    found = with_members(glance, found, policy)
    verdicts = report.rule_rows(policy.explain(found, live, now=now))
    desired, skipped = planner.targets(policy, found, stores, now=now)
    row = ledger.read_image(conn, found.id) if conn else None
    copies = [report.copy_row(c) for c in ledger.read_copies(conn, image_id=found.id)] \
        if conn else []
    ledger_note = None if row else "the daemon has not looked at this image yet" if conn \
        else "not readable"
    owner_quota = _owner_quota(env, glance, found.owner)
    if fmt == "json":
        cols = _columns(report.RULE_COLUMNS, columns, fmt)
        click.echo(output.dumps({**report.explain_record(
            found, output.records(cols, verdicts), desired, skipped, row, copies, ledger_note),
            "owner_quota": owner_quota}))
        return
    if fmt == "table":
        click.echo(report.glance_image_line(found))
    _echo_rows(report.RULE_COLUMNS, verdicts, fmt, columns, clock(), "the policy has no rules")
    if fmt == "table":
        click.echo("\n".join(report.explain_lines(found, desired, skipped, row, copies,
                                                  ledger_note, clock())))
        click.echo(report.owner_quota_text(owner_quota))


def _owner_quota(env: Env, glance, owner: str | None) -> dict:
    """The image owner's quota as the daemon checks it before a copy (Owners' quota)."""
    from imagesync import quota
    from imagesync.glance import GlanceError
    from imagesync.limits import OwnerQuota

    q = env.conf.quota
    state: dict = {"checked": q.check_owner_quota, "owner": owner,
                   "headroom_percent": q.headroom_percent}
    if not q.check_owner_quota or owner is None:
        return state
    reader = OwnerQuota(glance, q.headroom_percent, q.user_storage_quota)
    try:
        limits = reader.limits()
        state.update(source=limits.source, limit_bytes=limits.of(owner))
        if state["limit_bytes"] is not None:
            state["used_bytes"] = quota.usage(reader.owner_images(owner))
    except GlanceError as exc:
        state["error"] = str(exc)
    return state


# -- policy -------------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Work with policy files.

    Example: imagesync policy check --glance /etc/imagesync/policy.yaml
    """


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
@click.option("--glance", "with_glance", is_flag=True,
              help="Also check store names against the live Glance's store list, and "
                   "formats against its image schema (else Glance's default lists).")
@click.pass_obj
def policy_check(env: Env, file: str | None, with_glance: bool) -> None:
    """Validate a policy FILE (default: [imagesync] policy_file); exit 1 on any error.

    Errors and warnings are printed as FILE:LINE:COL: message.

    \b
    Examples:
      imagesync policy check /etc/imagesync/policy.yaml
      imagesync policy check --glance new-policy.yaml
    """
    from imagesync.policy import PolicyError, load_policy

    file = file or env.conf.imagesync.policy_file
    known, schema = None, None
    if with_glance:
        from imagesync.glance import GlanceError
        from imagesync.log import redact

        try:
            glance = env.glance()
            known = set(env.stores(glance))
            schema = glance.image_schema()
        except click.ClickException as exc:
            click.echo(f"{file}: warning: store names not checked: {redact(exc.message)}",
                       err=True)
        except GlanceError as exc:
            click.echo(f"{file}: warning: formats checked against Glance's default lists: "
                       f"its image schema is unreadable: {redact(str(exc))}", err=True)
    try:
        loaded = load_policy(file, known, schema=schema)
    except PolicyError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for w in loaded.warnings:
        click.echo(f"{w.file}:{w.line}:{w.column}: warning: {w.message}", err=True)
    checked = f", stores checked against Glance ({', '.join(sorted(known))})" if known else ""
    checked += ", formats against Glance's image schema" if schema else ""
    denies = f", {len(loaded.deny)} deny rule(s)" if loaded.deny else ""
    click.echo(f"{file}: OK, {len(loaded.rules)} rule(s){denies}{checked}")


# -- doctor -------------------------------------------------------------------------------


@main.command(short_help="Check Glance, RabbitMQ, the policy and the ledger.")
@click.pass_obj
def doctor(env: Env) -> None:
    """Check that imagesync can work here; each check says OK, WARN or FAIL, with a hint.

    The coordination backend (which member is active; when [coordination] backend_url
    is set), Glance reachable, multi-store on, copy-image enabled, credentials allowed to copy
    (Glance is asked to copy an image to a store it is already in, which it refuses: 400
    when the credentials may copy, 403 when not; nothing is copied), notifications
    arriving on the pool queue, the policy valid against the live stores, the ledger
    writable and private. Exit 1 if any check fails. Secrets are masked.

    Example: imagesync --config-file /etc/imagesync/imagesync.conf doctor
    """
    from imagesync import doctor as checks
    from imagesync.log import redact

    failed = False
    for result in checks.run(env.conf, clock()):
        click.echo(redact(f"{result.status:<5} {result.title}: {result.detail}"))
        if result.hint and result.status != "OK":
            click.echo(redact(f"      hint: {result.hint}"))
        failed |= result.status == "FAIL"
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
