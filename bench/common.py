"""Shared pieces of the benchmarks: a sandbox, figures, and min/median/max.

Every benchmark measures imagesync beside a baseline run in the same process or
the same run, so the ratios hold on a noisy machine. No assertions here: the
figures go to BENCHMARKS.md.

The sandbox is production-shaped (tools/sandbox.py): Keystone, two Glance API nodes behind
HAProxy with TLS. Baselines go the same way imagesync does: a Keystone token, Glance's
endpoint from the catalogue, TLS verified with the sandbox's CA.

IMAGESYNC_BENCH_QUICK=1 runs every benchmark at its smallest scale, to prove it runs (a
smoke run): its figures mean nothing, and `bench.run` then prints instead of writing
BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from imagesync import conf as imagesync_conf  # noqa: E402

import sandbox as sandbox_mod  # noqa: E402

BENCH_DIR = Path(os.environ.get("IMAGESYNC_BENCH_DIR", ROOT / ".sandbox-bench"))
QUICK = os.environ.get("IMAGESYNC_BENCH_QUICK", "") not in ("", "0")
RUNS = int(os.environ.get("IMAGESYNC_BENCH_RUNS", "1" if QUICK else "3"))
# The daemon's listener defaults unless the environment says otherwise (to compare settings).
LISTENER = {k: v for k, v in (
    ("batch_size", os.environ.get("IMAGESYNC_BENCH_BATCH_SIZE")),
    ("batch_timeout", os.environ.get("IMAGESYNC_BENCH_BATCH_TIMEOUT"))) if v}
# tests/daemon.py polls and backs off fast for quick tests; a benchmark runs the defaults.
COPY_DEFAULTS = {o.name: o.default for o in imagesync_conf.copy_opts
                 if o.name in ("poll_interval", "backoff_base", "backoff_cap")}


def get_sandbox() -> sandbox_mod.Sandbox:
    """The benchmarks' own sandbox, kept between runs (its 10,000-image catalogue is costly).

    A file lock keeps two benchmark processes from starting it at once."""
    import fcntl

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    with open(BENCH_DIR.with_name(BENCH_DIR.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        box = sandbox_mod.Sandbox(BENCH_DIR)
        if not all(box.running().values()):
            box.down()
            box.up()
        drop_orphan_queues(box)
    return box


def drop_orphan_queues(box) -> None:
    """Delete the queues earlier benchmarks' daemons and consumers left behind: each stays
    bound to Glance's exchange and collects every later notification (2.5 million once, and
    RabbitMQ's memory alarm then blocked the publishers). Called before each benchmark."""
    import kombu

    names = [q for q in box.queues() if q.startswith(("imagesync-test-", "imagesync-bench-"))]
    if not names:
        return
    url = box.glance_transport_url.replace("rabbit://", "amqp://", 1)
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)


def scale(full: int, quick: int) -> int:
    """`full`, or `quick` in a smoke run (IMAGESYNC_BENCH_QUICK=1)."""
    return quick if QUICK else full


def connect(box, cloud: str = sandbox_mod.CLOUD):
    """openstacksdk as one of the sandbox's clouds.yaml clouds (default: imagesync's own,
    admin of project `imagesync`); Glance comes from Keystone's catalogue, through HAProxy."""
    import openstack.config
    import openstack.connection

    region = openstack.config.OpenStackConfig(
        config_files=[str(box.clouds_yaml)], load_envvars=False).get_one(cloud)
    return openstack.connection.Connection(config=region)


def spread(values) -> str:
    """'min / median / max' of a list of numbers, 3 significant figures."""
    values = sorted(values)
    return " / ".join(f"{v:.3g}" for v in (values[0], statistics.median(values), values[-1]))


class Section:
    """One benchmark's rows for BENCHMARKS.md: figure, imagesync, baseline, ratio, goal."""

    def __init__(self, title: str, how: str):
        self.title, self.how, self.rows, self.notes = title, how, [], []

    def row(self, figure: str, imagesync: object, baseline: object = "", ratio: object = "",
            goal: object = "") -> None:
        """A row; a figure may be any value (a count is printed as it is)."""
        self.rows.append(tuple(str(v) for v in (figure, imagesync, baseline, ratio, goal)))
        print(f"  {figure}: {imagesync}  | baseline {baseline} | ratio {ratio} | goal {goal}",
              flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def markdown(self) -> str:
        out = [f"## {self.title}", "", self.how, "",
               "| figure | imagesync (min / median / max) | baseline | ratio | goal |",
               "|---|---|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in self.rows]
        out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"
