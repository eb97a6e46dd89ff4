"""Seed the sandbox's freshly bootstrapped Keystone: projects, users, roles, the image service
and its endpoints, and imagesync's application credential. Prints what was made as JSON.

Run by tools/sandbox.py with the Glance virtualenv's Python (it has openstacksdk), once per
sandbox: one SDK process does in seconds what the `openstack` CLI does in a minute.

    python sandbox_seed.py < request.json > seed.json

request: {"auth_url", "cacert", "region", "admin_password", "glance_url", "users": {name:
[password, project, role]}}. Nothing secret is printed but the application credential's
secret, which the sandbox writes into its 0600 clouds.yaml.
"""

from __future__ import annotations

import json
import sys

import openstack


def connect(req: dict, **auth):
    auth.setdefault("user_domain_name", "Default")
    auth.setdefault("project_domain_name", "Default")
    return openstack.connect(auth_url=req["auth_url"], region_name=req["region"],
                             interface="public", identity_api_version="3",
                             cacert=req["cacert"], **auth)


def main() -> int:
    req = json.load(sys.stdin)
    admin = connect(req, username="admin", password=req["admin_password"], project_name="admin")
    idn = admin.identity
    domain = idn.find_domain("default", ignore_missing=False)
    projects = {}
    for _user, (_pw, project, _role) in req["users"].items():
        if project not in projects:
            found = idn.find_project(project, domain_id=domain.id)
            projects[project] = (found or idn.create_project(name=project,
                                                             domain_id=domain.id)).id
    for name, (password, project, role) in req["users"].items():
        user = idn.find_user(name, domain_id=domain.id) or idn.create_user(
            name=name, password=password, domain_id=domain.id)
        idn.assign_project_role_to_user(projects[project], user,
                                        idn.find_role(role, ignore_missing=False))
    service = idn.find_service("glance") or idn.create_service(
        name="glance", type="image", description="OpenStack Image")
    for interface in ("public", "internal"):
        idn.create_endpoint(service_id=service.id, interface=interface,
                            url=req["glance_url"], region_id=req["region"])

    name, (password, project, _role) = "imagesync", req["users"]["imagesync"]
    sync = connect(req, username=name, password=password, project_name=project)
    credential = sync.identity.create_application_credential(
        user=sync.current_user_id, name="imagesync", description="imagesync daemon")
    json.dump({"projects": projects,
               "app_credential": {"id": credential.id, "secret": credential.secret,
                                  "roles": sorted(r["name"] for r in credential.roles)}},
              sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
