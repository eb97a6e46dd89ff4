"""Entry point of imagesync-daemon: validate, hand over systemd's socket, launch.

At start an invalid config, and at the very first start (no last good policy in
the ledger) an invalid policy, make the daemon exit non-zero with the errors: a
failing child would only be respawned forever by oslo.service. At each SIGHUP
the main process tells systemd RELOADING=1; the new worker says READY=1.
"""

from __future__ import annotations

import os
import sys
import warnings

# futurist imports eventlet when it is installed, which warns at import; we never use it.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

from oslo_config import cfg  # noqa: E402

from imagesync import conf as conf_mod  # noqa: E402


def _first_start(conf) -> bool:
    from imagesync.ledger import LedgerError, open_readonly

    try:
        conn = open_readonly(conf.imagesync.ledger_path)
    except LedgerError:
        return True
    try:
        return conn.execute("SELECT count(*) FROM policy").fetchone()[0] == 0
    finally:
        conn.close()


def _known_stores(conf):
    from imagesync.glance import Glance, GlanceError

    try:
        glance = Glance.connect(conf.imagesync.cloud, conf.imagesync.clouds_file, timeout=10)
        return set(glance.stores())
    except (GlanceError, Exception) as exc:  # unreachable or misconfigured: checked later
        print(f"imagesync-daemon: warning: cannot list Glance stores ({exc}); "
              "store names in the policy not checked", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    conf = conf_mod.Config(conf_mod.daemon_cli_opts)
    try:
        conf(sys.argv[1:] if argv is None else argv, project="imagesync",
             prog="imagesync-daemon",
             default_config_files=conf_mod.default_config_files())
    except cfg.Error as exc:
        print(f"imagesync-daemon: configuration error: {exc}", file=sys.stderr)
        return 2
    if not conf.reload_config_files():  # values are converted only when read: read them all
        for problem in conf.problems:
            print(f"imagesync-daemon: configuration error: {problem}", file=sys.stderr)
        return 2
    if conf.dry_run:
        conf.set_override("dry_run", True, group="imagesync")

    from imagesync.policy import PolicyError, load_policy

    if _first_start(conf):
        try:
            load_policy(conf.imagesync.policy_file, known_stores=_known_stores(conf))
        except PolicyError as exc:
            print(str(exc), file=sys.stderr)
            print("imagesync-daemon: not starting: the policy is invalid", file=sys.stderr)
            return 1

    from imagesync import systemd
    from imagesync.service import ImagesyncService, oslo_service  # selects the threading backend

    systemd.hand_over()
    main_pid = os.getpid()  # the hooks run in the forked worker too: only this process says it
    conf.on_sighup.append(lambda: os.getpid() == main_pid and systemd.notify(
        "RELOADING=1\nSTATUS=reloading: starting a worker with the files as they are now"))

    launcher = oslo_service.launch(conf, ImagesyncService(conf), workers=1,
                                   restart_method="mutate")
    return launcher.wait() or 0


if __name__ == "__main__":
    sys.exit(main())
