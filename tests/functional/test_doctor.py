"""`imagesync doctor`'s "credentials may copy" asks the real Glance the real question.

Glance 2025.1 and later let the `service` role read /v2/info/stores/detail while copy_image
stays admin-only, so doctor sends a copy-image request Glance must refuse: for a store the
image is already in. Glance checks the copy_image policy first, so an admin gets 400
"already present" and anyone else 403. Each test reads Glance's own access log: no import
doctor sent was accepted, and no task was created.

The identities are real Keystone users: imagesync's (admin of its project), member-a (a
member of tenant-a), and a user with only the `service` and `reader` roles that a test makes
as Keystone's admin and deletes afterwards.
"""

from __future__ import annotations

import datetime
import re
import secrets
import subprocess
import sys
import time
import uuid

import openstack.connection
import pytest
from access_log import AccessLog

from imagesync import doctor
from imagesync.glance import Glance

from helpers import upload_image

PROBED = re.compile(r"a copy-image request for image ([0-9a-f-]{36}) to store (\w+)")


def to_slow(prefix: str) -> str:
    return f"""
version: 1
rules:
  - name: {prefix}-slow
    match: {{name: "{prefix}-*"}}
    stores: [slow]
"""


@pytest.fixture
def public_image(admin_conn, prefix):
    """An image every project sees, so that non-admin credentials have one to ask about."""
    return upload_image(admin_conn, 1024, name=f"{prefix}-public", visibility="public")


def run_doctor(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                           str(d.conf_file), "doctor"], capture_output=True, text=True,
                          timeout=120)


def may_copy_line(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stdout.splitlines()
                if line[6:].startswith(doctor.MAY_COPY))


def probe_answers(log: AccessLog) -> dict[str, list[int]]:
    """image id -> statuses of the copy-image requests Glance answered since `log` began."""
    out: dict[str, list[int]] = {}
    for _, path, status in log.requests("POST", "/v2/images/"):
        if path.endswith("/import"):
            out.setdefault(path.split("/")[3], []).append(status)
    return out


def tasks_since(admin_conn, image_id: str, started: float) -> list[dict]:
    """Glance's import tasks of one image created after `started` (epoch seconds)."""
    tasks = admin_conn.image.get(f"/images/{image_id}/tasks").json()["tasks"]
    return [t for t in tasks if datetime.datetime.fromisoformat(t["created_at"].replace(
        "Z", "+00:00")).replace(tzinfo=datetime.timezone.utc).timestamp() >= started - 1]


def probe_candidates(admin_conn) -> set[str]:
    """The images doctor may ask about: the oldest active ones, as it lists them."""
    body = admin_conn.image.get(doctor.PROBE_LISTING).json()
    return {i["id"] for i in body["images"]}


def keystone_admin(sandbox):
    """openstacksdk as Keystone's bootstrap admin (it makes the users the sandbox lacks)."""
    return openstack.connection.Connection(
        auth_url=sandbox.keystone_url, username="admin", password=sandbox.password("admin"),
        project_name="admin", user_domain_name="Default", project_domain_name="Default",
        cacert=str(sandbox.cacert), region_name="RegionOne", interface="internal",
        identity_api_version="3")


@pytest.fixture
def service_user(sandbox, other_project):
    """A Keystone user of tenant-a with only the `service` and `reader` roles, made for this
    test and deleted after it: (name, password)."""
    admin = keystone_admin(sandbox)
    idn = admin.identity
    name, password = f"svc-{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    user = idn.create_user(name=name, password=password, domain_id="default")
    try:
        for role in ("service", "reader"):
            idn.assign_project_role_to_user(other_project, user,
                                            idn.find_role(role, ignore_missing=False))
        yield name, password
    finally:
        idn.delete_user(user)


def _connect_file(clouds: str, cloud: str):
    """openstacksdk from one cloud of a clouds.yaml of the test's own."""
    import openstack.config

    region = openstack.config.OpenStackConfig(
        config_files=[clouds], load_envvars=False).get_one(cloud)
    return openstack.connection.Connection(config=region)


def service_clouds_yaml(sandbox, tmp_path, user: str, password: str) -> str:
    """A clouds.yaml of this test's own naming the service user's cloud `svc` (0600)."""
    path = tmp_path / "service-clouds.yaml"
    path.write_text(f"""clouds:
  svc:
    auth_type: password
    auth:
      auth_url: {sandbox.keystone_url}
      username: {user}
      password: {password}
      project_name: tenant-a
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    interface: internal
    cacert: {sandbox.cacert}
    image_api_version: '2'
""")
    path.chmod(0o600)
    return str(path)


def test_doctor_says_an_admin_may_copy_after_glance_refused_its_probe_and_copied_nothing(
        sandbox, admin_conn, daemon, prefix, public_image):
    d = daemon(to_slow(prefix))  # never started: doctor reads Glance, not the daemon
    log = AccessLog(sandbox)
    started = time.time()

    result = run_doctor(d)

    line = may_copy_line(result)
    assert line.startswith("OK    credentials may copy: Glance's copy_image policy allows it"), \
        result.stdout
    image_id, store = PROBED.search(line).groups()
    assert "refused with 400 'already present' (nothing copied)" in line
    answers = probe_answers(log)
    assert answers.get(image_id) == [400], answers  # one probe, refused after the policy
    accepted = [i for i in probe_candidates(admin_conn) if 202 in answers.get(i, [])]
    assert accepted == [], f"Glance accepted imports of {accepted} during doctor"
    assert store in (admin_conn.image.get_image(image_id).properties.get("stores") or "")
    assert tasks_since(admin_conn, image_id, started) == []


def test_doctor_fails_a_member_whom_glance_refuses_the_copy_with_403(
        sandbox, member_conn, public_image):
    log = AccessLog(sandbox)

    result = doctor.copy_check(Glance(member_conn), "sandbox-member",
                               {"fast", "slow", "edge"})

    assert result.status == "FAIL", result
    assert result.detail.startswith("copy-image needs the admin role: Glance refused")
    image_id = PROBED.search(result.detail).group(1)
    assert probe_answers(log).get(image_id) == [403]
    assert "admin role" in result.hint


def test_doctor_fails_a_service_role_that_may_read_store_details_but_not_copy(
        sandbox, admin_conn, daemon, prefix, tmp_path, public_image, service_user):
    user, secret = service_user
    clouds = service_clouds_yaml(sandbox, tmp_path, user, secret)
    d = daemon(to_slow(prefix), {"imagesync": {"cloud": "svc", "clouds_file": clouds}})
    svc = _connect_file(clouds, "svc")
    roles = set(svc.session.auth.get_access(svc.session).role_names)
    assert roles == {"service", "reader"}, f"Keystone's token names the roles {roles}"
    # What the old check read: Glance 33 grants the service role the admin-only-looking page.
    assert svc.image.get("/info/stores/detail").status_code == 200
    log = AccessLog(sandbox)

    result = run_doctor(d)

    assert result.returncode == 1
    line = may_copy_line(result)
    assert line.startswith("FAIL  credentials may copy: copy-image needs the admin role"), line
    image_id = PROBED.search(line).group(1)
    assert probe_answers(log).get(image_id) == [403]
    assert "hint: give the user of cloud svc the admin role" in result.stdout
    assert secret not in result.stdout + result.stderr
