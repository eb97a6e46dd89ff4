"""Security stories on the real sandbox: secrets stay secret, the ledger stays private, the
daemon runs unprivileged, project rules keep to their project, and a member credential fails
clearly instead of looping.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import kombu
import pytest

import imagesync
from imagesync.log import redact

import sandbox as sandbox_mod
from daemon import Daemon, import_requests
from helpers import stores_of, upload_image, wait_for

UNPRIVILEGED_USER = "imagesync-test"
FORBIDDEN = "copy-image needs the admin role"
FERNET = re.compile(r"gAAAAA[A-Za-z0-9_-]{100,}")


@pytest.fixture
def prefix() -> str:
    return f"sec{uuid.uuid4().hex[:6]}"


@pytest.fixture
def daemons(sandbox):
    made: list[Daemon] = []
    yield made
    for d in made:
        if d.proc and d.proc.poll() is None:
            d.stop()
    with kombu.Connection(sandbox.transport_url.replace("rabbit://", "amqp://", 1)) as conn:
        for d in made:   # a stopped daemon's queue would keep collecting Glance's notifications
            with contextlib.suppress(conn.channel_errors):
                conn.default_channel.queue_delete(d.pool)


def to_slow(prefix: str, match: str = "") -> str:
    return f"""version: 1
rules:
  - name: security-{prefix}
    match: {{name: "{prefix}-*"{match}}}
    stores: [slow]
"""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m imagesync.cli ARGS` (the operator's `imagesync ARGS`)."""
    return subprocess.run([sys.executable, "-m", "imagesync.cli", *args], capture_output=True,
                          text=True, timeout=timeout, errors="replace", check=False)


def command_missing(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 2 and ("No such command" in result.stderr
                                       or "No such option" in result.stderr)


def member_conn(sandbox):
    """openstacksdk from the `sandbox-member` cloud: Keystone user member-a, a member of
    tenant-a, no admin role."""
    import openstack.config
    import openstack.connection

    region = openstack.config.OpenStackConfig(
        config_files=[str(sandbox.clouds_yaml)], load_envvars=False).get_one("sandbox-member")
    return openstack.connection.Connection(config=region)


def rabbitmqctl(sandbox, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(sandbox_mod.RABBIT_BIN / "rabbitmqctl"), *args],
                          env=sandbox._rabbit_env(), capture_output=True, text=True, timeout=120,
                          check=True)


@pytest.fixture
def rabbit_user(sandbox):
    """A RabbitMQ user of this test with a random password and the rights of imagesync's own
    user on the sandbox's vhost (read Glance's exchange, own queues imagesync*):
    (user, password)."""
    user, password = f"imagesync-sec-{uuid.uuid4().hex[:6]}", secrets.token_hex(20)
    rabbitmqctl(sandbox, "add_user", user, password)
    rabbitmqctl(sandbox, "set_permissions", "-p", sandbox_mod.VHOST, user,
                "^(glance|imagesync.*)$", "^imagesync.*$", "^(glance|imagesync.*)$")
    yield user, password
    rabbitmqctl(sandbox, "delete_user", user)


# -- 3. secrets never leak -------------------------------------------------------------------


@pytest.mark.parametrize("text, secret", [
    ("rabbit://imagesync:s3cr3t-pw@10.0.0.1:5672/", "s3cr3t-pw"),
    ("transport_url = rabbit://imagesync:s3cr3t-pw@ctl1:5672//", "s3cr3t-pw"),
    ("password=s3cr3t-pw", "s3cr3t-pw"),
    ("connection password = s3cr3t-pw", "s3cr3t-pw"),
    ('{"password":"s3cr3t-pw","user":"x"}', "s3cr3t-pw"),
    ("X-Auth-Token: s3cr3t-tok", "s3cr3t-tok"),
    # An HA deployment's transport_url names every RabbitMQ node, each with the password.
    (("rabbit://imagesync:s3cr3t-pw@ctl1:5672,imagesync:s3cr3t-pw@ctl2:5672,"
     "imagesync:s3cr3t-pw@ctl3:5672/"), "s3cr3t-pw"),
    # What str() of a dict looks like in an exception (openstacksdk/keystoneauth auth dicts).
    (str({"auth": {"endpoint": "http://g:9292", "token": "s3cr3t-tok"}}), "s3cr3t-tok"),
    (str({"password": "s3cr3t-pw"}), "s3cr3t-pw"),
], ids=["url", "conf-line", "key=value", "key = value", "json", "header", "multi-host-url",
        "repr-token", "repr-password"])
def test_redact_masks_credentials(text, secret):
    masked = redact(text)
    assert secret not in masked, f"redact({text!r}) = {masked!r}"
    assert "***" in masked


def test_a_masked_json_log_line_keeps_every_field():
    # A Sentinel URL's query password, then more fields: masking stops at the value's end
    line = json.dumps({"coordination": "redis://:pw@h:26379?sentinel=m&sentinel_password=s3",
                       "event": "imagesync started", "token": "tok s3", "n": 1},
                      separators=(",", ":"))
    masked = json.loads(redact(line))
    assert masked["event"] == "imagesync started" and masked["n"] == 1
    assert "s3" not in json.dumps(masked) and "pw@" not in json.dumps(masked)


def test_redact_keeps_urls_without_credentials():
    text = "GET http://127.0.0.1:9292/v2/images?limit=5 from rabbit://guest@host:5672/"
    assert redact(text) == text


def test_no_secret_reaches_the_daemons_log_the_cli_or_the_ledger(
        sandbox, admin_conn, daemons, prefix, rabbit_user, tmp_path, figures):
    user, password = rabbit_user
    # The Keystone secrets the two daemons authenticate with: imagesync's application
    # credential (the admin side) and member-a's password (the member side); and the other
    # passwords the clouds.yaml holds.
    keystone = sandbox.state["keystone"]
    secrets_ = {"RabbitMQ password": password,
                "application credential secret": keystone["app_credential"]["secret"],
                **{f"{u}'s Keystone password": sandbox.password(u)
                   for u in ("member-a", "imagesync", "owner-a", "member-b")}}
    port = sandbox.state["rabbit"]["port"]
    dead = sandbox_mod.free_port()
    # Two RabbitMQ hosts, the first one down: connection errors get logged.
    transport = (f"rabbit://{user}:{password}@127.0.0.1:{dead},"
                 f"{user}:{password}@127.0.0.1:{port}/{sandbox_mod.VHOST}")
    clouds = tmp_path / "clouds.yaml"   # the sandbox's: passwords and the app credential
    shutil.copy(sandbox.clouds_yaml, clouds)
    assert all(s in clouds.read_text() for k, s in secrets_.items() if k != "RabbitMQ password")
    ledger = tmp_path / "ledger" / "ledger.sqlite"
    common = {"DEFAULT": {"transport_url": transport},
              "imagesync": {"clouds_file": clouds, "ledger_path": ledger, "log_level": "DEBUG"}}
    admin = Daemon(sandbox, tmp_path / "admin", to_slow(prefix),
                   {**common, "imagesync": {**common["imagesync"], "cloud": "sandbox-appcred"}})
    member = Daemon(sandbox, tmp_path / "member", to_slow(prefix),
                    {**common, "imagesync": {**common["imagesync"], "cloud": "sandbox-member"}})
    admin.ledger_path = member.ledger_path = ledger
    daemons += [admin, member]

    # Syncs as imagesync, authenticated by its application credential.
    admin.start()
    images = [upload_image(admin_conn, 4096, name=f"{prefix}-{i}") for i in range(2)]
    for image in images:   # done in the ledger (what status shows), then seen in Glance
        wait_for(lambda i=image: admin.copies(i.id).get("slow") == "done", timeout=60,
                 message=f"{image.id} copied to slow")
        assert "slow" in stores_of(admin_conn, image.id)
    admin.stop()
    # Failures as the member cloud: Keystone gives member-a a token (for its password), which
    # goes with every request and is refused on copy.
    member.start()
    mine = upload_image(member_conn(sandbox), 4096, name=f"{prefix}-member")
    wait_for(lambda: member.copies(mine.id).get("slow") == "failed", timeout=60,
             message="the member's copy refused and failed")
    member.stop()

    outputs = {"daemon log (admin cloud)": admin.log_path.read_text(errors="replace"),
               "daemon log (member cloud)": member.log_path.read_text(errors="replace")}
    missing = []
    for conf in (admin.conf_file, member.conf_file):
        for args in (["status"], ["status", "--failed"], ["status", mine.id],
                     ["status", "--format", "json"], ["doctor"], ["plan"],
                     ["explain", images[0].id], ["policy", "check", "--glance"]):
            result = cli("--config-file", str(conf), *args)
            name = f"imagesync {' '.join(args)} ({conf.parent.name} cloud)"
            if command_missing(result):
                missing.append(name)
            outputs[name] = result.stdout + result.stderr
    outputs["ledger file"] = b"".join(p.read_bytes() for p in ledger.parent.iterdir()
                                      if p.is_file()).decode(errors="replace")

    # Keystone's tokens themselves (Fernet: base64url of a 0x80 version byte, "gAAAAA...").
    found = {where: sum(text.count(s) for s in secrets_.values()) + len(FERNET.findall(text))
             for where, text in outputs.items()}
    leaks = {where: n for where, n in found.items() if n}
    cmd = "pytest tests/reliability/test_security.py -k no_secret"
    figures("secrets", "outputs searched (daemon logs, CLI commands, ledger)", len(outputs), cmd)
    figures("secrets", "secrets searched for",
            ", ".join([*secrets_, "any Keystone token"]), cmd)
    figures("secrets", "secrets found in output", sum(found.values()), cmd)
    if missing:
        figures("secrets", "CLI commands not available yet", ", ".join(missing), cmd)
    assert admin.query("SELECT count(*) AS n FROM copies WHERE state = 'done'")[0]["n"] >= 2
    assert not leaks, "secrets found: " + ", ".join(
        f"{where}: {n} (e.g. {_context(outputs[where], secrets_)!r})"
        for where, n in leaks.items())


def _context(text: str, secrets_: dict[str, str]) -> str:
    tokens = {f"token {i}": t for i, t in enumerate(FERNET.findall(text))}
    for name, secret in {**secrets_, **tokens}.items():
        at = text.find(secret)
        if at >= 0:
            return text[max(0, at - 120):at + len(secret) + 20].replace(secret, f"<{name}>")
    return ""


# -- 4. the ledger is private ------------------------------------------------------------------


def test_the_ledger_and_its_wal_are_0600_in_a_0700_directory_the_daemon_created(
        sandbox, admin_conn, daemons, prefix, tmp_path, figures):
    state = tmp_path / "state"
    ledger = state / "imagesync" / "ledger.sqlite"
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix), {"imagesync": {"ledger_path": ledger}})
    d.ledger_path = ledger
    daemons.append(d)
    d.start()
    image = upload_image(admin_conn, 4096, name=f"{prefix}-a")
    wait_for(lambda: d.copies(image.id) == {"slow": "done"}, timeout=60,
             message="the copy recorded done")

    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ledger.parent.iterdir()}
    dirs = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
            for p in (state, ledger.parent)}
    cmd = "pytest tests/reliability/test_security.py -k 0600"
    figures("ledger privacy", "ledger file modes",
            ", ".join(f"{n} {oct(m)[2:]}" for n, m in sorted(files.items())), cmd)
    figures("ledger privacy", "directory modes",
            ", ".join(f"{n} {oct(m)[2:]}" for n, m in sorted(dirs.items())), cmd)
    assert {"ledger.sqlite", "ledger.sqlite-wal"} <= set(files), files
    assert all(mode == 0o600 for mode in files.values()), files
    assert all(mode == 0o700 for mode in dirs.values()), dirs


# -- 5. the daemon runs unprivileged -----------------------------------------------------------


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def _as_user(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def _open_for_reading(*paths: str) -> None:
    """Let other users read these trees (tox makes .tox 0700); modes come back at exit."""
    changed: list[tuple[Path, int]] = []
    for path in paths:
        for directory in [Path(path), *Path(path).parents]:
            mode = directory.stat().st_mode & 0o7777
            if mode & 0o005 != 0o005:
                changed.append((directory, mode))
                directory.chmod(mode | 0o005)
    atexit.register(lambda: [d.chmod(m) for d, m in reversed(changed)])


def _python_for(user: str, cwd: Path) -> tuple[list[str], str]:
    """A command that runs `python -m imagesync.cmd` as `user`, and which interpreter it is.

    This virtualenv's interpreter may sit under a directory the user cannot enter (a pyenv
    under /root); then the system's python of the same version runs with this virtualenv's
    site-packages (which hold imagesync and its dependencies) and nothing else.
    """
    probe = subprocess.run([*_as_user(user), sys.executable, "-c", "import imagesync.cmd"],
                           capture_output=True, cwd=cwd, check=False)
    if probe.returncode == 0:
        return [sys.executable, "-m", "imagesync.cmd"], sys.executable
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    root = str(Path(imagesync.__file__).resolve().parent.parent)  # editable installs, too
    _open_for_reading(site, root)
    boot = (f"import runpy, site, sys; site.addsitedir({site!r}); sys.path.insert(0, {root!r}); "
            "sys.argv[0] = 'imagesync-daemon'; "
            "runpy.run_module('imagesync.cmd', run_name='__main__', alter_sys=True)")
    return [system, "-I", "-S", "-c", boot], f"{system} with {site}"


class UnprivilegedDaemon(Daemon):
    """The daemon started through setpriv as another user; everything else as Daemon."""

    def __init__(self, sandbox, workdir: Path, policy: str, user: pwd.struct_passwd,
                 options: dict | None = None):
        self.user = user
        workdir = Path(workdir)
        clouds, cacert = workdir / "clouds.yaml", workdir / "ca.pem"
        workdir.mkdir(parents=True, exist_ok=True)
        # The user cannot enter the sandbox's directory: its own copy of the CA, named by its
        # own copy of clouds.yaml.
        shutil.copy(sandbox.cacert, cacert)
        clouds.write_text(sandbox.clouds_yaml.read_text().replace(
            f"cacert: {sandbox.cacert}\n", f"cacert: {cacert}\n"))
        assert str(sandbox.cacert) not in clouds.read_text()
        options = {**(options or {})}
        options["imagesync"] = {"clouds_file": clouds,
                                "ledger_path": workdir / "state" / "ledger.sqlite",
                                **options.get("imagesync", {})}
        super().__init__(sandbox, workdir, policy, options)
        self.ledger_path = options["imagesync"]["ledger_path"]
        (workdir / "state").mkdir(mode=0o700)
        for path in (workdir, workdir / "state", clouds, cacert, self.policy_file,
                     self.conf_file):
            os.chown(path, user.pw_uid, user.pw_gid)
        for path in (clouds, self.policy_file, self.conf_file):
            path.chmod(0o600)
        self.python, self.interpreter = _python_for(user.pw_name, workdir)

    def start(self, *args: str, wait: bool = True, env: dict[str, str] | None = None):
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:   # the daemon keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [*_as_user(self.user.pw_name), *self.python, "--config-file",
                 str(self.conf_file), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.dir,
                env={**os.environ, "HOME": str(self.dir), "PYTHONUNBUFFERED": "1",
                     **(env or {})})
        if wait:
            wait_for(lambda: self.proc.poll() is not None or
                     any(e.get("event") == "imagesync started" for e in self.logs(True)),
                     timeout=60, message="the unprivileged daemon to start")
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.tail()}"
        return self


def _ids(pid: int) -> tuple[list[int], list[int], int]:
    """Real, effective, saved and filesystem uids and gids, and the effective capabilities."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ([int(u) for u in status["Uid"].split()], [int(g) for g in status["Gid"].split()],
            int(status["CapEff"].strip(), 16))


def test_the_daemon_runs_and_syncs_as_an_unprivileged_user(
        sandbox, admin_conn, daemons, prefix, figures):
    user = _ensure_user(UNPRIVILEGED_USER)
    workdir = Path(tempfile.mkdtemp(prefix="imagesync-unprivileged-", dir="/tmp"))
    try:
        d = UnprivilegedDaemon(sandbox, workdir, to_slow(prefix), user)
        daemons.append(d)
        d.start()
        image = upload_image(admin_conn, 4096, name=f"{prefix}-a")
        wait_for(lambda: "slow" in stores_of(admin_conn, image.id), timeout=60,
                 message="the image in slow, copied by the unprivileged daemon")
        pids = d.children()
        ids = {pid: _ids(pid) for pid in pids}
        ledger = Path(d.ledger_path)
        owner = ledger.stat().st_uid
        cmd = "pytest tests/reliability/test_security.py -k unprivileged"
        figures("unprivileged daemon", "daemon uid/gid (processes)",
                f"{user.pw_uid}/{user.pw_gid} {user.pw_name} ({len(pids)} processes: parent "
                "and child)", cmd)
        figures("unprivileged daemon", "interpreter", d.interpreter, cmd)
        d.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    assert len(pids) >= 2, f"expected the parent and its child, found {pids}"
    for pid, (uids, gids, caps) in ids.items():
        assert uids == [user.pw_uid] * 4, f"process {pid} runs with uids {uids}"
        assert gids == [user.pw_gid] * 4, f"process {pid} runs with gids {gids}"
        assert caps == 0, f"process {pid} has capabilities {caps:#x}"
    assert owner == user.pw_uid
    assert import_requests(sandbox, image.id) == 1


# -- 6. a project rule keeps to its project ------------------------------------------------------


def test_a_rule_naming_a_project_never_copies_another_projects_private_image(
        sandbox, admin_conn, other_admin_conn, other_project, daemons, prefix, tmp_path,
        figures):
    d = Daemon(sandbox, tmp_path / "d",
               to_slow(prefix, match=f", projects: [{other_project}]"))
    daemons.append(d)
    d.start()

    theirs = upload_image(other_admin_conn, 4096, name=f"{prefix}-other", visibility="private")
    ours = upload_image(admin_conn, 4096, name=f"{prefix}-admin", visibility="private")

    wait_for(lambda: "slow" in stores_of(admin_conn, theirs.id), timeout=60,
             message="the named project's private image in slow")
    wait_for(lambda: d.query("SELECT seen_at FROM images WHERE id = ? AND seen_at IS NOT NULL",
                             ours.id), timeout=30,
             message="the daemon to have looked at the other project's image")
    time.sleep(2)  # anything it would do, it does right after the visit
    imports = import_requests(sandbox, ours.id)
    cmd = "pytest tests/reliability/test_security.py -k names_a_project"
    figures("project rules", "copy-image requests for another project's private image",
            imports, cmd)
    assert imports == 0
    assert d.copies(ours.id) == {}
    assert stores_of(admin_conn, ours.id) == {"fast"}
    assert d.copies(theirs.id) == {"slow": "done"}


# -- 7. a non-admin credential fails clearly, once -------------------------------------------------


def test_a_member_credential_fails_its_copies_once_pauses_imports_and_doctor_says_why(
        sandbox, daemons, prefix, tmp_path, scale, figures):
    window = 20 if scale["full"] else 12
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix), {"imagesync": {"cloud": "sandbox-member"}})
    daemons.append(d)
    d.start()
    member = member_conn(sandbox)

    image = upload_image(member, 4096, name=f"{prefix}-first")
    wait_for(lambda: d.copies(image.id).get("slow") == "failed", timeout=60,
             message="the member's copy to end failed")
    later = upload_image(member, 4096, name=f"{prefix}-later")
    wait_for(lambda: d.copies(later.id).get("slow") == "pending", timeout=30,
             message="the second image's copy planned")
    time.sleep(window)

    row = d.copy(image.id, "slow")
    first_imports, later_imports = import_requests(sandbox, image.id), \
        import_requests(sandbox, later.id)
    errors = [e for e in d.logs() if e.get("level") == "error" and FORBIDDEN in json.dumps(e)]
    doctor = cli("--config-file", str(d.conf_file), "doctor")
    cmd = "pytest tests/reliability/test_security.py -k member_credential"
    figures("member credential", f"imports of the refused image in {window} s", first_imports, cmd)
    figures("member credential", f"imports of a later image in the {window} s after a 403",
            later_imports, cmd)
    figures("member credential", "ledger state and message",
            f"{row['state']}: {row['error_message']}", cmd)
    figures("member credential", "imagesync doctor",
            "not available yet" if command_missing(doctor) else
            f"exit {doctor.returncode}, "
            + next((line.strip() for line in doctor.stdout.splitlines() if FORBIDDEN in line),
                   "no line about the admin role"), cmd)

    assert row["state"] == "failed" and FORBIDDEN in (row["error_message"] or ""), dict(row)
    assert row["error_status"] == 403
    assert errors, f"no error line says {FORBIDDEN!r}:\n{d.tail()}"
    assert first_imports == 1, f"{first_imports} imports after a 403: a retry loop"
    assert later_imports == 0, "imports went on after a 403 (they should pause)"
    assert d.copies(later.id) == {"slow": "pending"}
    assert d.proc.poll() is None
    if not command_missing(doctor):
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert any(line.startswith("FAIL") and FORBIDDEN in line
                   for line in doctor.stdout.splitlines()), doctor.stdout
