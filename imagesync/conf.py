"""imagesync's oslo.config options, grouped, with list_opts() for oslo-config-generator.

Declares options, and `Config`: a ConfigOpts whose reloads never trade working
settings for broken ones. Talks to no service. The daemon and the CLI build
their ConfigOpts here and pass it down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from oslo_config import cfg, types

from imagesync import quota

DEFAULT_CONFIG = "/etc/imagesync/imagesync.conf"

imagesync_opts = [
    cfg.StrOpt("policy_file", default="/etc/imagesync/policy.yaml",
               help="The YAML policy naming which stores each image belongs in."),
    cfg.StrOpt("ledger_path", default="/var/lib/imagesync/ledger.sqlite",
               help="The SQLite ledger of every copy. Created 0600; keep it on local disk."),
    cfg.IntOpt("ledger_max_size_mb", default=0, min=0,
                help="Largest size the ledger may grow to (MiB; 0 = no cap). When it is "
                     "full, notifications are held, not lost, until space is freed."),
    cfg.StrOpt("cloud", default="imagesync",
               help="Name of the clouds.yaml entry holding Glance credentials (openstacksdk "
                    "looks in ./clouds.yaml, ~/.config/openstack and /etc/openstack)."),
    cfg.StrOpt("clouds_file",
               help="Read clouds.yaml from this path instead of openstacksdk's search path."),
    cfg.BoolOpt("dry_run", default=False,
                help="Plan and record copies in the ledger, but import nothing."),
    cfg.StrOpt("log_format", default="auto", choices=["auto", "json", "console"],
               help="json: one JSON object per line (journald); console: readable; "
                    "auto: console on a TTY, json otherwise."),
    cfg.StrOpt("log_level", default="INFO",
               choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Lowest level logged."),
]

notification_opts = [
    cfg.StrOpt("exchange", default="glance", help="Exchange Glance publishes on."),
    cfg.StrOpt("topic", default="notifications",
               help="Notification topic; must be one of Glance's "
                    "[oslo_messaging_notifications] topics."),
    cfg.StrOpt("pool", default="imagesync",
               help="Listener pool: imagesync gets its own queue of this name, so it "
                    "never takes notifications from other consumers (Ceilometer)."),
    cfg.IntOpt("batch_size", default=200, min=1,
               help="Notifications handled per batch (one ledger commit per batch)."),
    cfg.FloatOpt("batch_timeout", default=0.01, min=0.0,
                 help="Seconds to wait for a batch to fill before handling what arrived. "
                      "Under load batches fill by size anyway; a long wait only delays the "
                      "reaction to a quiet upload (see BENCHMARKS.md)."),
    cfg.IntOpt("executor_threads", default=1, min=1,
               deprecated_for_removal=True,
               deprecated_reason="The listener's own thread records each batch and then "
                                 "acknowledges it; there is no pool of threads to size.",
               help="Ignored."),
]

copy_opts = [
    cfg.IntOpt("max_imports", default=4, min=1,
               help="Copy-image imports in flight at once, across all stores."),
    cfg.IntOpt("max_imports_per_store", default=2, min=1,
               help="Imports in flight that write to one store."),
    cfg.IntOpt("max_bytes_in_flight", default=0, min=0,
               help="Bytes of image data being copied at once; 0 = no cap."),
    cfg.IntOpt("max_bytes_per_hour", default=0, min=0,
               help="Bytes copied per rolling hour; 0 = no cap."),
    cfg.FloatOpt("glance_requests_per_second", default=20.0, min=0.1,
                 help="Cap on imagesync's own request rate to Glance."),
    cfg.IntOpt("max_attempts", default=6, min=1,
               help="Failed copy attempts to one store before the copy is marked failed."),
    cfg.FloatOpt("backoff_base", default=30.0, min=0.0,
                 help="Seconds before the first retry; doubles per attempt, with jitter."),
    cfg.FloatOpt("backoff_cap", default=3600.0, min=0.0, help="Longest delay between retries."),
    cfg.FloatOpt("quota_retry_delay", default=3600.0, min=0.0,
                 help="Delay before retrying a copy refused for quota."),
    cfg.IntOpt("unknown_store_tries", default=3, min=1,
               help="Tries before a store Glance does not know blocks the copy."),
    cfg.FloatOpt("poll_interval", default=2.0, min=0.05,
                 help="Seconds from an import's start to its first poll; each later poll "
                      "waits as long again as the import has taken, up to "
                      "long_import_poll_interval (the notification of its end brings a look "
                      "at once; polls are the safety net)."),
    cfg.FloatOpt("long_import_poll_interval", default=30.0, min=0.05,
                 help="Seconds between polls of an import of ours older than a minute: its "
                      "end comes as a notification (task.success / task.failure); the polls "
                      "are the safety net for a lost one."),
    cfg.FloatOpt("lock_poll_interval", default=60.0, min=0.1,
                 help="Seconds between looks at an image whose import lock another import "
                      "holds."),
    cfg.FloatOpt("settle_grace", default=10.0, min=0.0,
                 help="Seconds an import may show no lock and no result before it is judged "
                      "(Glance sets the lock asynchronously after answering 202)."),
    cfg.FloatOpt("lock_expiry", default=3600.0,
                 help="Age (s) after which Glance preempts an import lock whose task is "
                      "processing (Glance: 60 min; 120 min for a pending task)."),
    cfg.FloatOpt("image_backoff_base", default=2.0, min=0.1,
                 help="Seconds an image is left alone after Glance gave no real answer about "
                      "it (429, 401, 403 to a read, 5xx, a dropped connection, a timeout); "
                      "doubles with each such answer in a row, with jitter. A Retry-After "
                      "is honoured. No attempt is used."),
    cfg.FloatOpt("image_backoff_cap", default=300.0, min=0.1,
                 help="Longest wait of image_backoff_base (a longer Retry-After is cut to "
                      "it); also caps the pause of all work while Glance or Keystone is down "
                      "(never above 60 s)."),
    cfg.FloatOpt("image_request_share", default=0.1, min=0.01, max=1.0,
                 help="Largest share of glance_requests_per_second that requests about one "
                      "image may use (with bursts of 10 s worth), so that no image can take "
                      "the request budget of the others."),
]

reconcile_opts = [
    cfg.FloatOpt("interval", default=600.0, min=0.0,
                 help="Seconds between full passes over every image (0 = only at start)."),
    cfg.IntOpt("page_size", default=1000, min=1, max=1000, help="Images per list request."),
    cfg.FloatOpt("stores_cache_ttl", default=300.0, min=0.0,
                 help="Seconds the live store list is cached."),
]

metrics_opts = [
    cfg.BoolOpt("enabled", default=False,
                help="Serve Prometheus metrics over HTTP (GET /metrics). Off by default."),
    cfg.HostAddressOpt("host", default="127.0.0.1",
                       help="Address the metrics endpoint listens on. It has no "
                            "authentication, so it must be a loopback address (127.0.0.1, "
                            "::1, localhost) unless allow_non_loopback is set."),
    cfg.PortOpt("port", default=9393, help="TCP port of the metrics endpoint."),
    cfg.BoolOpt("allow_non_loopback", default=False,
                help="Allow a host that is not a loopback address. The endpoint is "
                     "unauthenticated and shows store names and copy counts: put a firewall "
                     "or a proxy in front of it."),
]

ledger_opts = [
    cfg.FloatOpt("keep_deleted_images_days", default=30.0, min=0.0,
                 help="Days the rows of an image Glance deleted (and all its copies) are "
                      "kept; also how long an image with nothing left to track stays after "
                      "Glance last showed it."),
    cfg.FloatOpt("keep_settled_copies_days", default=30.0, min=0.0,
                 help="Days done and cancelled copies are kept after they settled. Failed "
                      "and open copies are kept for as long as their image lives."),
    cfg.FloatOpt("keep_requests_days", default=30.0, min=0.0,
                 help="Days a CLI request (retry, sync) is kept after the daemon took it."),
    cfg.FloatOpt("prune_interval", default=3600.0, min=1.0,
                 help="Seconds between prunes of the ledger (also one soon after start). "
                      "Near ledger_max_size_mb it prunes at once, ahead of the retention."),
    cfg.FloatOpt("split_imports_after", default=300.0, min=0.0,
                 help="Seconds an image waits for room in every store it needs before its "
                      "copies go in more than one import (each copy-image import reads the "
                      "whole image into staging). 0: send to the stores with room at once."),
]

class StorageQuota(types.ConfigType):
    """Glance's user_storage_quota syntax ("0", "500MB", "10GB"), read as bytes."""

    def __init__(self) -> None:
        super().__init__(type_name="storage quota: bytes, or a number with B, KB, MB, GB or TB")

    def __call__(self, value) -> int:
        return value if isinstance(value, int) else quota.parse_storage_quota(str(value))

    def _formatter(self, value) -> str:
        return str(value)


quota_opts = [
    cfg.BoolOpt("check_owner_quota", default=True,
                help="Before a copy, check that it fits in the image owner's quota: Glance "
                     "checks the quota of the caller (imagesync's project) but counts every "
                     "copy in the owner's usage (size x stores). With Keystone unified limits "
                     "in Glance (GET /v2/info/usage shows image_size_total), the owner's "
                     "image_size_total limit is read from Keystone; else "
                     "user_storage_quota below, if set. A copy that does not fit is held "
                     "(no attempt used) and re-checked every recheck_interval."),
    cfg.FloatOpt("headroom_percent", default=10.0, min=0.0, max=100.0,
                 help="Share of an owner's limit imagesync's copies leave free for the "
                      "owner's own uploads."),
    cfg.Opt("user_storage_quota", type=StorageQuota(), default="0",
            help="Glance's legacy [DEFAULT] user_storage_quota, copied here (imagesync "
                 "cannot read Glance's configuration): 0 = none; bytes, or a number with "
                 "B, KB, MB, GB or TB (powers of 1024). Unified limits take precedence."),
    cfg.FloatOpt("limits_cache_ttl", default=60.0, min=0.0,
                 help="Seconds Keystone's limits are cached: a raised limit lets held copies "
                      "go within this plus recheck_interval."),
    cfg.FloatOpt("recheck_interval", default=60.0, min=1.0,
                 help="Seconds between checks of a copy held for its owner's quota."),
]

coordination_opts = [
    cfg.StrOpt("backend_url", secret=True,
               help="tooz coordination backend shared by the imagesync daemons of several "
                    "controllers, e.g. redis://:PASSWORD@ctl1:6379, redis://:PASSWORD@ctl1:"
                    "26379?sentinel=mymaster&sentinel_fallback=ctl2:26379 or "
                    "etcd3+http://ctl1:2379. One daemon is active (consumes notifications, "
                    "imports, reconciles); the others stand by. Unset: this daemon works "
                    "alone."),
    cfg.StrOpt("member_id", sample_default="<host name>",
               help="This daemon's name among the members (default: the host name); "
                    "unique per controller."),
    cfg.IntOpt("lease", default=15, min=3,
               help="Seconds the active daemon's claim lives in the backend without a "
                    "renewal; renewed every third of it. The active daemon sends no import "
                    "once its claim may have lapsed; a standby takes over after at most "
                    "about this long."),
]

GROUPS: dict[str, Sequence[cfg.Opt]] = {
    "imagesync": imagesync_opts,
    "notifications": notification_opts,
    "copy": copy_opts,
    "reconcile": reconcile_opts,
    "metrics": metrics_opts,
    "ledger": ledger_opts,
    "coordination": coordination_opts,
    "quota": quota_opts,
}


def list_opts():
    """For oslo-config-generator (entry point oslo.config.opts: imagesync)."""
    return [(None if name == "DEFAULT" else name, opts) for name, opts in GROUPS.items()]


def register(conf: cfg.ConfigOpts) -> cfg.ConfigOpts:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)
    return conf


daemon_cli_opts = [
    cfg.BoolOpt("dry-run", default=False,
                help="Plan and record copies, import nothing (same as [imagesync] dry_run)."),
]


def check_files(argv: list[str], cli_opts: Iterable[cfg.Opt] = (), **kw) -> list[str]:
    """What is wrong with the files `argv` names: parse them into a scratch ConfigOpts and
    read every option (oslo.config converts values only when they are read)."""
    scratch = register(cfg.ConfigOpts())
    scratch.register_cli_opts(list(cli_opts))
    try:
        scratch(argv, **kw)
    except cfg.Error as exc:
        return [str(exc)]
    found = []
    for group, opts in GROUPS.items():
        for opt in opts:
            try:
                getattr(scratch[group], opt.dest)
            except (cfg.Error, ValueError) as exc:
                found.append(f"[{group}] {opt.dest}: {exc}")
    return found


class Config(cfg.ConfigOpts):
    """A ConfigOpts whose reloads keep the settings in force when the files are broken.

    On SIGHUP oslo.service (cotyledon) calls mutate_config_files() in the parent and in
    the old worker, and the new worker calls reload_config_files(). Both first check the
    files with `check_files()`; only clean files are applied, else `self.problems` says why.
    The parent applies every option, not only mutable ones: a worker it forks later starts
    from the last good settings. `on_sighup` callables run at each SIGHUP reload.
    """

    def __init__(self, cli_opts: Iterable[cfg.Opt] = ()):
        super().__init__()
        register(self)
        self._cli = list(cli_opts)
        self.register_cli_opts(self._cli)
        self._call: tuple[list[str], dict] = ([], {})
        self.problems: list[str] = []
        self.on_sighup: list[Callable[[], object]] = []

    def __call__(self, args=None, **kw):
        self._call = (list(args or []), kw)
        return super().__call__(args, **kw)

    def reload_config_files(self) -> bool:
        argv, kw = self._call
        self.problems = check_files(argv, self._cli, **kw)
        return not self.problems and super().reload_config_files()

    def mutate_config_files(self):
        for hook in self.on_sighup:
            hook()
        if not self.reload_config_files():
            return {}
        return super().mutate_config_files()


def default_config_files() -> list[str]:
    import os

    return [DEFAULT_CONFIG] if os.path.exists(DEFAULT_CONFIG) else []


def load(argv: list[str] | None = None, config_files: list[str] | None = None,
         prog: str = "imagesync") -> cfg.ConfigOpts:
    """A fresh ConfigOpts with every option registered and the files parsed."""
    conf = register(cfg.ConfigOpts())
    if config_files is None:
        config_files = default_config_files()
    conf(argv or [], project="imagesync", prog=prog, default_config_files=config_files)
    return conf
