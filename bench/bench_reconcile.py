"""Benchmark 4: one reconcile pass over 10,000 images, beside plain HTTP paging of the same lists.

Builds the `bench-cat-` catalogue in the bench sandbox once (later runs only top it up),
then times each pass in a fresh subprocess, so peak RSS is per measurement:
imagesync's Reconciler over a real Glance and a real ledger, and urllib paging the same
two lists (visibility=all, then os_hidden=true) with json-decoding. Never asserts.

Both go the way a client goes in production: a Keystone token of imagesync's user (admin
of project `imagesync`), Glance's endpoint from the token's catalogue, HAProxy's TLS
verified with the sandbox's CA, two Glance API nodes behind it. The catalogue is built
with raw requests too, as real Keystone users: imagesync's own (its public images) and a
member user of PROJECTS Keystone projects made for the catalogue (the other images).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, RUNS, Section, connect, get_sandbox, sandbox_mod, scale, spread

PREFIX = "bench-cat-"
CATALOGUE = scale(10_000, 400)
WITH_DATA = 200        # images 0..199: 64 KiB of data in store fast, public
DATA_SIZE = 64 * 1024
HIDDEN = 100           # images 200..299: os_hidden=true
PROJECTS = 20          # the other images belong to 20 projects (imagesync's own: public ones)
BUILD_THREADS = 8
ADMIN = None           # the owner of the public images: imagesync's project (cloud `sandbox`)
SEEDER = "bench-cat-seeder"   # a member of each of the PROJECTS projects
USER = "imagesync"     # imagesync's Keystone user (cloud `sandbox`), admin of its project
PAGE = 1000
GOAL_RATIO = 1.5

POLICY = f"""\
version: 1
rules:
  - name: catalogue-never
    description: Matches the catalogue by name, then wants a tag no image has.
    match:
      name: "{PREFIX}*"
      tags: [bench-no-image-has-this-tag]
    stores: [slow]
  - name: everything
    match: {{}}
    stores: [fast]
"""


# -- the catalogue ------------------------------------------------------------------------


def _spec(n: int) -> dict:
    """Image n of the catalogue: its name, owner, visibility, hidden flag and data."""
    spec = {"name": f"{PREFIX}{n:05d}", "data": n < WITH_DATA, "hidden": False,
            "project": ADMIN, "visibility": "public"}
    if WITH_DATA <= n < WITH_DATA + HIDDEN:
        spec["hidden"] = True
        spec["visibility"] = "shared"
        spec["project"] = _project(n)
    elif n >= WITH_DATA + HIDDEN:
        kind = n % 10
        if kind >= 2:
            spec["project"] = _project(n)
            spec["visibility"] = ("community" if kind < 4 else "shared" if kind < 7
                                  else "private")
    return spec


def _project(n: int) -> str:
    """The name of the Keystone project owning image n (not one of imagesync's)."""
    return f"{PREFIX}p{n % PROJECTS:02d}"


class Identities:
    """Keystone tokens for the catalogue's owners, and the TLS context HAProxy needs.

    imagesync's own cloud (`sandbox`) for its public images and for listing; for the other
    images, SEEDER, a member of PROJECTS projects `bench-cat-pNN`, made here as Keystone's
    bootstrap admin when missing (its password is reset each run: the sandbox keeps none)."""

    def __init__(self, box):
        import openstack

        self.box, self.tls = box, ssl.create_default_context(cafile=str(box.cacert))
        common = {"auth_url": box.keystone_url, "cacert": str(box.cacert),
                  "region_name": sandbox_mod.REGION, "user_domain_name": "Default"}
        admin = openstack.connect(username="admin", password=box.password("admin"),
                                  project_name="admin", project_domain_name="Default", **common)
        idn = admin.identity
        domain = idn.find_domain("default", ignore_missing=False)
        member = idn.find_role("member", ignore_missing=False)
        password = secrets.token_hex(16)
        user = idn.find_user(SEEDER, domain_id=domain.id)
        user = (idn.update_user(user, password=password) if user else
                idn.create_user(name=SEEDER, password=password, domain_id=domain.id))
        self.sessions = {ADMIN: connect(box).session}
        for i in range(PROJECTS):
            name = _project(i)
            project = (idn.find_project(name, domain_id=domain.id) or
                       idn.create_project(name=name, domain_id=domain.id,
                                          description="imagesync benchmark catalogue"))
            idn.assign_project_role_to_user(project, user, member)
            conn = openstack.connect(username=SEEDER, password=password,
                                     project_id=project.id, **common)
            self.sessions[name] = conn.session
        for session in self.sessions.values():  # every token now, before the threads
            session.get_token()

    def headers(self, project: str | None = ADMIN) -> dict:
        """X-Auth-Token of `project`'s user (keystoneauth renews it when it nears expiry)."""
        return {"X-Auth-Token": self.sessions[project].get_token()}


def _http(url: str, method: str = "GET", body=None, headers=None, data: bytes | None = None,
          tls: ssl.SSLContext | None = None):
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=120, context=tls) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == 4:
                raise RuntimeError(f"{method} {url}: HTTP {exc.code} {exc.read()[:300]!r}") \
                    from exc
        except (urllib.error.URLError, ConnectionError):
            if attempt == 4:
                raise
        time.sleep(0.5 * (attempt + 1))
    return None


def list_all(base: str, ids: Identities) -> list[dict]:
    """Every image an admin sees: visibility=all, then the hidden ones (plain paging)."""
    images = []
    for hidden in (False, True):
        path = f"/v2/images?limit={PAGE}&visibility=all" + ("&os_hidden=true" if hidden else "")
        while path:
            body = _http(base + path, headers=ids.headers(), tls=ids.tls)
            images += body["images"]
            path = body.get("next")
    return images


def _create(base: str, n: int, ids: Identities) -> None:
    spec = _spec(n)
    headers = ids.headers(spec["project"])
    body = {"name": spec["name"], "disk_format": "raw", "container_format": "bare",
            "visibility": spec["visibility"], "tags": ["bench-catalogue"],
            "bench_index": str(n)}
    if spec["hidden"]:
        body["os_hidden"] = True
    image = _http(f"{base}/v2/images", "POST", body, headers, tls=ids.tls)
    if spec["data"]:
        _upload(base, image["id"], n, headers, ids.tls)


def _upload(base: str, image_id: str, n: int, headers: dict, tls: ssl.SSLContext) -> None:
    data = (n.to_bytes(4, "big") * (DATA_SIZE // 4))[:DATA_SIZE]
    _http(f"{base}/v2/images/{image_id}/file", "PUT", data=data,
          headers={**headers, "Content-Type": "application/octet-stream",
                   "X-Image-Meta-Store": "fast"}, tls=tls)


def ensure_catalogue(box) -> dict:
    """Count the catalogue; create only what is missing. Returns figures about it."""
    base = box.glance_url   # HAProxy: the endpoint Keystone's catalogue names
    t0 = time.monotonic()
    ids = Identities(box)
    existing = [i for i in list_all(base, ids) if (i.get("name") or "").startswith(PREFIX)]
    by_name: dict[str, list[dict]] = {}
    for image in existing:
        by_name.setdefault(image["name"], []).append(image)
    missing, doomed = [], []
    for n in range(CATALOGUE):
        found = by_name.get(_spec(n)["name"], [])
        keep = next((i for i in found if not _spec(n)["data"] or i["status"] == "active"), None)
        doomed += [i["id"] for i in found if i is not keep]
        if keep is None:
            missing.append(n)
    print(f"  catalogue: {len(existing)} {PREFIX}* images found, {len(missing)} to create, "
          f"{len(doomed)} to delete", flush=True)
    with concurrent.futures.ThreadPoolExecutor(BUILD_THREADS) as pool:
        for image_id in doomed:
            pool.submit(_http, f"{base}/v2/images/{image_id}", "DELETE",
                        headers=ids.headers(), tls=ids.tls).result()
        futures = [pool.submit(_create, base, n, ids) for n in missing]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()
            if done % 1000 == 0:
                rate = done / (time.monotonic() - t0)
                print(f"  created {done}/{len(missing)} ({rate:.0f}/s)", flush=True)
    everything = list_all(base, ids)
    figures = {"images": len(everything),
               "hidden": sum(1 for i in everything if i.get("os_hidden")),
               "active": sum(1 for i in everything if i.get("status") == "active"),
               "catalogue": sum(1 for i in everything
                                if (i.get("name") or "").startswith(PREFIX)),
               "created": len(missing), "seconds": time.monotonic() - t0}
    print(f"  catalogue ready in {figures['seconds']:.0f} s: {figures}", flush=True)
    return figures


# -- one measurement, in a fresh process ---------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _thread_cpu(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keystone_token(keystone_url: str, tls: ssl.SSLContext, password: str) -> tuple[str, str]:
    """What a hand script does with urllib: a password token of imagesync's user, scoped to
    its project, and Glance's internal endpoint from the token's catalogue."""
    user, project = USER, sandbox_mod.USERS[USER][0]
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}}
    req = urllib.request.Request(keystone_url + "/auth/tokens", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60, context=tls) as resp:
        token, catalog = resp.headers["X-Subject-Token"], json.loads(resp.read())
    image = next(s for s in catalog["token"]["catalog"] if s["type"] == "image")
    endpoint = next(e["url"] for e in image["endpoints"]
                    if e["interface"] == "internal" and e["region_id"] == sandbox_mod.REGION)
    return token, endpoint.rstrip("/")


def measure_plain(keystone_url: str, cacert: str, password: str) -> dict:
    """urllib GET limit=1000 following `next`, visibility=all then os_hidden=true, with a
    Keystone token and TLS verified with the CA, to the catalogue's Glance endpoint
    (HAProxy). The token is taken before the clock starts, as imagesync's is (in its
    warm-up); each page is a new TLS connection, as urllib makes them."""
    tls = ssl.create_default_context(cafile=cacert)
    token, base = keystone_token(keystone_url, tls, password)
    headers = {"X-Auth-Token": token}
    rss_before = _rss_kib()
    cpu = time.thread_time()
    t0 = time.perf_counter()
    requests = pages = images = 0
    for hidden in (False, True):
        path = f"/v2/images?limit={PAGE}&visibility=all" + ("&os_hidden=true" if hidden else "")
        while path:
            req = urllib.request.Request(base + path, headers=headers)
            with urllib.request.urlopen(req, timeout=120, context=tls) as resp:
                body = json.loads(resp.read())
            requests += 1
            pages += 1
            images += len(body["images"])
            path = body.get("next")
    return {"seconds": time.perf_counter() - t0, "cpu_main": time.thread_time() - cpu,
            "requests": requests, "list_requests": requests,
            "wire_requests": requests, "pages": pages, "images": images,
            "rss_before_kib": rss_before}


def _imagesync_pass(workdir: Path, clouds: str, profile: bool = False) -> dict:
    """Set up like the daemon does (Glance, Ledger, policy), then time one run_pass()."""
    import requests.adapters

    from imagesync.executor import PolicyHolder
    from imagesync.glance import Glance
    from imagesync.ledger import Ledger
    from imagesync.policy import load_policy
    from imagesync.reconcile import Reconciler

    wire = []
    send = requests.adapters.HTTPAdapter.send

    def counting_send(self, request, *args, **kw):
        wire.append((request.method, request.url))
        return send(self, request, *args, **kw)

    requests.adapters.HTTPAdapter.send = counting_send
    glance = Glance.connect(cloud="sandbox", clouds_file=clouds, rate=1000)
    calls = []
    request = glance._request

    def counting_request(method, path, **kw):
        calls.append((method, path))
        return request(method, path, **kw)

    glance._request = counting_request
    known = set(glance.stores())  # warm: endpoint discovery, as in a running daemon
    (workdir / "policy.yaml").write_text(POLICY)
    policy = PolicyHolder(load_policy(workdir / "policy.yaml", known_stores=known))
    ledger = Ledger(workdir / "ledger.sqlite")
    reconciler = Reconciler(ledger, glance, policy, interval=0, page_size=PAGE)
    writer = ledger._thread.native_id
    rss_before = _rss_kib()
    del calls[:], wire[:]
    glance_before = glance.requests
    cpu_main, cpu_writer = time.thread_time(), _thread_cpu(writer)
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        profiler.start()
    t0 = time.perf_counter()
    figures = reconciler.run_pass()
    seconds = time.perf_counter() - t0
    if profiler:
        profiler.stop()
    result = {
        "seconds": seconds, "pass": figures, "pages": figures["pages"],
        "images": figures["images"], "marked": figures["marked"],
        "settled_from_listing": figures.get("settled_from_listing", 0),
        "requests": glance.requests - glance_before,
        "list_requests": sum(1 for m, p in calls if m == "GET" and p.startswith("/images?")),
        "wire_requests": len(wire),
        "wire_list_requests": sum(1 for m, u in wire if m == "GET" and "/images?" in u),
        "cpu_main": time.thread_time() - cpu_main, "cpu_writer": _thread_cpu(writer) - cpu_writer,
        "rss_before_kib": rss_before,
    }
    if profiler:
        result["profile"] = _top_frames(profiler.last_session, 5)
        (workdir / "profile.txt").write_text(profiler.output_text(unicode=False, color=False))
    ledger.close()
    return result


def _top_frames(session, n: int) -> list[dict]:
    """The n functions with the most self time in the profiled thread, aggregated."""
    totals: dict[str, float] = {}
    stack = [session.root_frame()]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.is_synthetic:
            continue
        if frame.total_self_time > 0:
            key = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
            totals[key] = totals.get(key, 0.0) + frame.total_self_time
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [{"frame": k, "seconds": v, "share": v / session.duration} for k, v in top]


def _prime(workdir: Path, clouds: str) -> dict:
    """A first pass on an empty ledger, then visits (from the listing) of what it marked,
    so the timed passes meet the steady state a running daemon keeps."""
    from imagesync import planner
    from imagesync.glance import Glance
    from imagesync.ledger import Ledger
    from imagesync.policy import load_policy

    cold = _imagesync_pass(workdir, clouds)
    glance = Glance.connect(cloud="sandbox", clouds_file=clouds, rate=1000)
    stores = glance.stores()
    policy = load_policy(workdir / "policy.yaml", known_stores=set(stores))
    ledger = Ledger(workdir / "ledger.sqlite")
    now = time.time()
    due = set(ledger.due_images(now + 1, 1_000_000))
    visited = 0
    for hidden in (False, True):
        for page in glance.list_pages(PAGE, hidden=hidden):
            for image in page:
                if image.id in due:
                    desired, skipped = planner.targets(policy, image, stores)
                    ledger.record_visit(image.id, image, desired, skipped, now,
                                        planner.Settings())
                    visited += 1
    ledger.close()
    cold["visited"] = visited
    return cold


def _measure_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", choices=["plain", "imagesync", "profile", "prime"])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keystone-url")
    parser.add_argument("--cacert")
    parser.add_argument("--clouds")
    args = parser.parse_args(argv)
    if args.measure == "plain":
        # The password comes in the environment, not on the command line.
        result = measure_plain(args.keystone_url, args.cacert, os.environ["BENCH_OS_PASSWORD"])
    elif args.measure == "prime":
        result = _prime(args.workdir, args.clouds)
    else:
        result = _imagesync_pass(args.workdir, args.clouds, profile=args.measure == "profile")
    result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result))


def _subprocess(box, kind: str, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", kind,
           "--workdir", str(workdir), "--keystone-url", box.keystone_url,
           "--cacert", str(box.cacert), "--clouds", str(box.clouds_yaml)]
    env = dict(os.environ, BENCH_OS_PASSWORD=box.password(USER))
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} measurement exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark -------------------------------------------------------------------------


def run() -> Section:
    section = Section(
        f"Reconcile: one full pass over {CATALOGUE:,} images",
        f"The bench sandbox's Glance holds the `{PREFIX}` catalogue ({CATALOGUE:,} images: "
        f"{WITH_DATA} with {DATA_SIZE // 1024} KiB of data, {HIDDEN} hidden, the rest "
        f"metadata-only owned by {PROJECTS} Keystone projects, every visibility) plus "
        f"whatever other benchmarks left there. imagesync: `Reconciler.run_pass()` with "
        f"`Glance.connect(rate=1000)`, a real ledger in a temp dir already holding the "
        f"previous pass (the steady state), and a two-rule policy (name `{PREFIX}*` with a "
        f"tag no image has -> slow; `match: {{}}` -> fast). Baseline: urllib paging the same "
        f"two lists (visibility=all, then os_hidden=true; limit={PAGE}, following `next`, "
        f"json-decoding each page). Both as imagesync's Keystone user (password, project "
        f"`imagesync`), to the Glance endpoint of Keystone's catalogue: HAProxy's TLS, two "
        f"Glance API nodes; each takes its token before the clock starts. "
        f"Each measurement is a fresh process (so peak RSS is its own); "
        f"{RUNS} runs of each, interleaved.")
    print(f"== {section.title}", flush=True)
    box = get_sandbox()
    cat = ensure_catalogue(box)
    with tempfile.TemporaryDirectory(prefix="imagesync-bench-reconcile-") as tmp:
        workdir = Path(tmp)
        cold = _subprocess(box, "prime", workdir)
        print(f"  first pass on an empty ledger: {cold['seconds']:.2f} s, "
              f"{cold['marked']} marked, then {cold['visited']} visits recorded", flush=True)
        ours, plain = [], []
        for i in range(RUNS):
            plain.append(_subprocess(box, "plain", workdir))
            ours.append(_subprocess(box, "imagesync", workdir))
            print(f"  run {i + 1}: imagesync {ours[-1]['seconds']:.2f} s "
                  f"({ours[-1]['pages']} pages, {ours[-1]['images']} images, "
                  f"{ours[-1]['marked']} marked), plain {plain[-1]['seconds']:.2f} s", flush=True)
        prof = _subprocess(box, "profile", workdir)
        profile_text = (workdir / "profile.txt").read_text()

    def values(results, key, scale=1.0):
        return [r[key] * scale for r in results]

    def ratio_of(key):
        return statistics.median(values(ours, key)) / statistics.median(values(plain, key))

    ratio = ratio_of("seconds")
    section.row("pass wall time (s)", spread(values(ours, "seconds")),
                spread(values(plain, "seconds")), f"{ratio:.2f}x",
                f"≤ {GOAL_RATIO}x: {'met' if ratio <= GOAL_RATIO else 'NOT met'}")
    pages = ours[0]["pages"]
    lists = max(values(ours, "list_requests"))
    section.row("list requests (GET /images?...) per pass",
                spread(values(ours, "list_requests")), spread(values(plain, "list_requests")),
                "", f"≤ pages + 2 = {pages + 2}: {'met' if lists <= pages + 2 else 'NOT met'}")
    section.row("Glance requests per pass (imagesync's counter; wire count)",
                f"{spread(values(ours, 'requests'))}; wire {spread(values(ours, 'wire_requests'))}",
                spread(values(plain, "requests")))
    section.row("pages / images per pass",
                f"{pages} / {ours[0]['images']}", f"{plain[0]['pages']} / {plain[0]['images']}")
    section.row("images marked for a visit per pass", spread(values(ours, "marked")))
    cold_ratio = cold["seconds"] / statistics.median(values(plain, "seconds"))
    section.row("first pass on a fresh ledger: wall time (s)", f"{cold['seconds']:.2f}",
                spread(values(plain, "seconds")), f"{cold_ratio:.2f}x",
                f"≤ {GOAL_RATIO}x: {'met' if cold_ratio <= GOAL_RATIO else 'NOT met'}")
    section.row("first pass on a fresh ledger: images left for a GET (the executor's visits)",
                cold["marked"], "", "", f"0: {'met' if cold['marked'] == 0 else 'NOT met'}")
    section.row("peak RSS of the process (MiB)", spread(values(ours, "peak_rss_kib", 1 / 1024)),
                spread(values(plain, "peak_rss_kib", 1 / 1024)),
                f"{ratio_of('peak_rss_kib'):.1f}x")
    section.row("RSS after imports and setup, before the pass (MiB)",
                spread(values(ours, "rss_before_kib", 1 / 1024)),
                spread(values(plain, "rss_before_kib", 1 / 1024)))
    section.row("CPU of the main thread during the pass (s)", spread(values(ours, "cpu_main")),
                spread(values(plain, "cpu_main")),
                f"{ratio_of('cpu_main'):.1f}x")
    section.row("CPU of the ledger writer thread during the pass (s)",
                spread(values(ours, "cpu_writer")))
    section.note(f"catalogue: {cat['catalogue']:,} `{PREFIX}` images; Glance lists "
                 f"{cat['images']:,} in all ({cat['hidden']} hidden, {cat['active']} active); "
                 f"{cat['created']} created this run in {cat['seconds']:.0f} s.")
    section.note(f"the first pass on an empty ledger took {cold['seconds']:.2f} s, recorded "
                 f"{cold.get('settled_from_listing', 0)} images from the listing alone and "
                 f"marked {cold['marked']} for a visit (a GET each); those visits were "
                 f"recorded before the timed runs, as the daemon's executor would.")
    if math.isclose(pages, ours[0]["list_requests"]):
        section.note(f"imagesync sent exactly one list request per page ({pages}), plus "
                     f"{ours[0]['requests'] - ours[0]['list_requests']} other request(s) "
                     f"(the store list).")
    top = "; ".join(f"{f['frame']} {f['seconds']:.2f} s ({f['share']:.0%})"
                    for f in prof["profile"])
    section.note(f"pyinstrument, one pass ({prof['seconds']:.2f} s under the profiler; the "
                 f"ledger writer thread is not sampled, its CPU was {prof['cpu_writer']:.2f} s), "
                 f"top 5 frames by self time: {top}")
    print(profile_text[:6000], flush=True)
    return section


if __name__ == "__main__":
    if "--measure" in sys.argv:
        _measure_main(sys.argv[1:])
    else:
        print(run().markdown())
