"""Reloads of imagesync.conf: clean files apply, broken ones leave the settings in force."""

from __future__ import annotations

from imagesync import conf as conf_mod


def loaded(tmp_path, text: str) -> tuple[conf_mod.Config, object]:
    path = tmp_path / "imagesync.conf"
    path.write_text(text)
    conf = conf_mod.Config(conf_mod.daemon_cli_opts)
    conf(["--config-file", str(path)], project="imagesync", default_config_files=[])
    return conf, path


def test_a_reload_with_a_changed_value_applies_it(tmp_path):
    conf, path = loaded(tmp_path, "[copy]\nmax_imports = 3\n")
    path.write_text("[copy]\nmax_imports = 7\n")

    assert conf.reload_config_files() is True
    assert conf.copy.max_imports == 7 and conf.problems == []


def test_a_reload_of_a_file_that_does_not_parse_keeps_the_settings_in_force(tmp_path):
    conf, path = loaded(tmp_path, "[copy]\nmax_imports = 3\n")
    path.write_text("[copy\nmax_imports = 7\n")

    assert conf.reload_config_files() is False
    assert conf.copy.max_imports == 3
    assert conf.problems and str(path) in conf.problems[0]


def test_a_reload_with_a_bad_value_keeps_the_settings_in_force_and_names_the_option(tmp_path):
    conf, path = loaded(tmp_path, "[copy]\nmax_imports = 3\n")
    path.write_text("[copy]\nmax_imports = many\n[imagesync]\nlog_level = LOUD\n")

    assert conf.reload_config_files() is False
    assert conf.copy.max_imports == 3 and conf.imagesync.log_level == "INFO"
    assert any(p.startswith("[copy] max_imports:") for p in conf.problems), conf.problems
    assert any(p.startswith("[imagesync] log_level:") for p in conf.problems), conf.problems


def test_a_sighup_reload_runs_the_hooks_even_when_the_files_are_broken(tmp_path):
    conf, path = loaded(tmp_path, "[copy]\nmax_imports = 3\n")
    calls = []
    conf.on_sighup.append(lambda: calls.append(conf.copy.max_imports))

    path.write_text("[copy]\nmax_imports = 0\n")  # below min=1
    assert conf.mutate_config_files() == {}
    path.write_text("[copy]\nmax_imports = 5\n")
    conf.mutate_config_files()

    assert calls == [3, 3]
    assert conf.copy.max_imports == 5, "the parent applies every option, not only mutable ones"
