"""The README is the operator guide: every command, command option and config option is in it.

Walks the click group of imagesync.cli (subgroups too, e.g. `policy check`) and every option
of imagesync.conf.list_opts(), and fails naming what README.md lacks. Also guards the README's
opening: the title, then the two commands `tools/demo` and `tools/test`. Pure text checks:
no services, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from imagesync import cli, conf

README_PATH = Path(__file__).resolve().parents[2] / "README.md"
README = README_PATH.read_text(encoding="utf-8")


def commands(group: click.Group, prefix: str = "imagesync"):
    """(`imagesync status`, command), … for every command and subgroup, depth first."""
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from commands(command, path)


def long_options(command: click.Command) -> list[str]:
    return sorted(opt for param in command.params if isinstance(param, click.Option)
                  for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--"))


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for every Markdown heading outside code blocks."""
    out: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in out]


def config_options():
    for group, opts in conf.list_opts():
        for opt in opts:
            yield group or "DEFAULT", opt.name


def option_documented(group: str, name: str) -> bool:
    """`[group] name` anywhere, or `name` in backticks under a heading naming `[group]`."""
    if f"[{group}] {name}" in README:
        return True
    return any(f"[{group}]" in heading and f"`{name}`" in body
               for heading, body in sections(README))


ALL_COMMANDS = list(commands(cli.main))


def test_the_walk_finds_every_command_including_subcommands():
    paths = {path for path, _ in ALL_COMMANDS}
    assert {"imagesync status", "imagesync policy", "imagesync policy check",
            "imagesync doctor"} <= paths


@pytest.mark.parametrize("path", [p for p, c in ALL_COMMANDS if not isinstance(c, click.Group)])
def test_every_cli_command_is_in_the_readme(path):
    assert path in README, f"README.md does not mention `{path}`: document it"


def test_every_cli_option_is_in_the_readme():
    missing = [f"{path} {opt}" for path, command in
               [("imagesync", cli.main), *ALL_COMMANDS]
               for opt in long_options(command) if opt not in README]
    assert not missing, f"README.md does not mention these options: {', '.join(missing)}"


def test_every_config_option_is_in_the_readme():
    options = list(config_options())
    assert len(options) > 30  # the walk found imagesync's groups, not nothing
    missing = [f"[{g}] {n}" for g, n in options if not option_documented(g, n)]
    assert not missing, (
        "README.md does not document these options (write `[group] name`, or `name` in a "
        f"table under a heading naming `[group]`): {', '.join(missing)}")


def test_the_readme_still_opens_with_the_two_commands():
    lines = README.splitlines()
    assert lines[0] == "# imagesync"
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert end < first_section, "the two commands must come before the first section"
    assert [line.split()[0] for line in lines[start + 1:end]] == ["tools/demo", "tools/test"]
    after = next(line for line in lines[end + 1:] if line.strip())
    assert after.startswith("Both run as root on Debian 12")


# -- docs that must agree with the code, one check per kind of disagreement found ---------
# Each kind once slipped through: a transport URL scheme oslo.messaging lacks (`rabbits://`),
# doctor output the code cannot print (`no queue ''`), two modes for one installed file,
# a daemon option the CLI lacks (`--config-dir`), and a plan action left undocumented.

SAMPLES = sorted((README_PATH.parent / "etc" / "imagesync").glob("*.sample"))
DOCS = {"README.md": README, **{p.name: p.read_text(encoding="utf-8") for p in SAMPLES}}
NOT_TRANSPORTS = {"http", "https", "driver"}  # web links; oslo's own `driver://` template
DOCTOR_LINE = re.compile(r"^(OK|WARN|FAIL)\s+([^:]+): ", re.M)


def _without_doctor_output(text: str) -> str:
    """Doctor's output shows kombu's `amqp://` rendering of the broker, not a transport URL."""
    return DOCTOR_LINE.sub("", "\n".join(line for line in text.splitlines()
                                         if not DOCTOR_LINE.match(line)))


def test_every_url_scheme_in_the_docs_is_an_oslo_messaging_or_tooz_driver_or_a_web_link():
    from importlib.metadata import entry_points

    drivers = {e.name for e in entry_points(group="oslo.messaging.drivers")}
    backends = {e.name for e in entry_points(group="tooz.backends")}   # [coordination]
    assert "rabbit" in drivers and {"redis", "etcd3+http"} <= backends
    wrong = sorted({f"{name}: {scheme}://" for name, text in DOCS.items()
                    for scheme in re.findall(r"\b([a-z][a-z0-9+.-]*)://",
                                             _without_doctor_output(text))
                    if scheme not in drivers | backends | NOT_TRANSPORTS})
    assert not wrong, (f"no oslo.messaging or tooz driver has these schemes: {', '.join(wrong)} "
                       f"(drivers: {', '.join(sorted(drivers))}; TLS is [oslo_messaging_rabbit] "
                       "ssl = true with rabbit://)")


def test_doctor_output_quoted_in_the_readme_has_titles_and_queues_doctor_can_print():
    from imagesync import doctor

    lines = [title for _, title in DOCTOR_LINE.findall(README)]
    inline = [text.split(":")[0] for text in re.findall(r"`(?:OK|WARN|FAIL) ([^`]*)`", README)
              if not text.startswith("…")]
    assert len(lines) >= 9  # the full example of `imagesync doctor` at least
    unknown = sorted({title for title in lines + inline if title not in doctor.TITLES})
    assert not unknown, f"doctor has no check titled {unknown} (it has {doctor.TITLES})"
    queues = re.findall(r"queue '([^']*)'", README)
    assert queues and "" not in queues, (
        "the README quotes doctor naming an empty queue; doctor.queue_name() never does "
        "(no pool: <topic>.info)")


INSTALL = re.compile(r"install((?:\s+-[mog]\s+\S+)+)\s+\S+\s+/etc/imagesync/([\w.]+)")
TABLE_ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|[^|\n]*\|\s*(0[0-7]{3}) (\w+):(\w+)\s*\|", re.M)
MODE = re.compile(r"\b(0[0-7]{3}),? (\w+):(\w+)\b")


def stated_modes() -> dict[str, set[tuple[str, str, str]]]:
    """/etc/imagesync file -> every (mode, owner, group) the docs state for it: install
    commands and the install table anywhere, and `MODE user:group` in a section whose
    heading names the file."""
    found: dict[str, set[tuple[str, str, str]]] = {}
    for text in DOCS.values():
        for flags, name in INSTALL.findall(text.replace("\\\n", " ")):
            opts = dict(re.findall(r"-([mog])\s+(\S+)", flags))
            if "m" in opts:
                found.setdefault(name, set()).add(
                    (opts["m"], opts.get("o", "root"), opts.get("g", "root")))
        for name, mode, owner, group in TABLE_ROW.findall(text):
            found.setdefault(name, set()).add((mode, owner, group))
    for heading, body in sections(README):
        for name in [n for n in found if n in heading]:
            found[name].update(MODE.findall(body))
    return found


def test_every_installed_file_has_one_mode_and_owner_across_the_docs():
    modes = stated_modes()
    assert {"imagesync.conf", "policy.yaml", "clouds.yaml"} <= set(modes)
    assert modes["clouds.yaml"] >= {("0600", "imagesync", "imagesync")}
    clashing = {name: sorted(stated) for name, stated in modes.items() if len(stated) > 1}
    assert not clashing, f"the docs state different modes for: {clashing}"


def daemon_options() -> set[str]:
    """The long options `imagesync-daemon --help` lists (oslo.config's and imagesync's)."""
    import io

    daemon = conf.Config(conf.daemon_cli_opts)
    daemon([], project="imagesync", prog="imagesync-daemon", default_config_files=[],
           default_config_dirs=[])
    out = io.StringIO()
    daemon.print_help(out)
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z_-]*)", out.getvalue()))


DAEMON_ONLY = {"--dry-run", "--nodry-run"}  # how the daemon runs; the CLI imports nothing
GENERIC = {"--help", "--shell_completion"}  # oslo.config's own; click has its equivalents


def test_the_cli_takes_every_option_of_the_daemon_that_says_where_the_config_is():
    found = daemon_options()
    assert {"--config-file", "--config-dir", "--dry-run"} <= found
    missing = sorted(found - DAEMON_ONLY - GENERIC - set(long_options(cli.main)))
    assert not missing, f"imagesync lacks the daemon's {', '.join(missing)}"
    undocumented = sorted(o for o in found - GENERIC - {"--nodry-run"}
                          if f"`{o}" not in README)
    assert not undocumented, f"README.md does not mention imagesync-daemon {undocumented}"


def test_every_plan_action_is_explained_under_imagesync_plan():
    from imagesync import report

    plan_section = next(body for heading, body in sections(README)
                        if heading == "### imagesync plan")
    missing = [a for a in report.PLAN_ACTIONS if f"`{a}`" not in plan_section]
    assert not missing, f"README.md's `imagesync plan` does not explain actions {missing}"
