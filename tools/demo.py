"""Demo on the sandbox: upload an image to `fast`, copy it to `slow` and `edge`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openstack.config  # noqa: E402
import openstack.connection  # noqa: E402

import sandbox  # noqa: E402


def main() -> int:
    box = sandbox.Sandbox(sandbox.DEFAULT_DIR)
    region = openstack.config.OpenStackConfig(config_files=[str(box.clouds_yaml)],
                                              load_envvars=False).get_one(sandbox.CLOUD)
    conn = openstack.connection.Connection(config=region)
    image = conn.image.create_image(name="demo-cirros", disk_format="raw",
                                    container_format="bare", visibility="public")
    conn.image.put(f"/images/{image.id}/file", data=b"\0" * (8 << 20),
                   headers={"Content-Type": "application/octet-stream",
                            "X-Image-Meta-Store": "fast"})
    image = conn.image.get_image(image.id)
    print(f"uploaded {image.id} to {image.properties['stores']}")
    resp = conn.image.import_image(image, method="copy-image", stores=["slow", "edge"],
                                   all_stores_must_succeed=False)
    print(f"copy-image to slow, edge: HTTP {resp.status_code}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        image = conn.image.get_image(image.id)
        if not image.properties.get("os_glance_import_task") and \
                len(image.properties["stores"].split(",")) == 3:
            break
        time.sleep(0.2)
    print(f"image {image.id} is in stores: {image.properties['stores']}")
    return 0 if len(image.properties["stores"].split(",")) == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
