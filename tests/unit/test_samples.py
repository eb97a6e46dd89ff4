"""The sample files in etc/imagesync are what operators copy: they must be current and valid.

imagesync.conf.sample is regenerated here exactly as `tox -e genconfig` does and compared
with the committed one; policy.yaml.sample goes through the daemon's own validation;
clouds.yaml.sample through openstacksdk's loader.
"""

from __future__ import annotations

import difflib
import pathlib
import re
import warnings
from importlib.metadata import version

import openstack.config
from oslo_config import cfg, generator

from imagesync import conf as conf_mod
from imagesync.policy import MATCHERS, load_policy

ETC = pathlib.Path(__file__).resolve().parent.parent.parent / "etc" / "imagesync"
CONF_SAMPLE = ETC / "imagesync.conf.sample"
GENERATOR_CONF = ETC / "imagesync-config-generator.conf"


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^\[([^\]]+)\]$", text, flags=re.MULTILINE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_the_committed_config_sample_is_what_genconfig_generates(tmp_path):
    out = tmp_path / "imagesync.conf.sample"

    with warnings.catch_warnings():  # the oslo.messaging namespace imports eventlet helpers
        warnings.simplefilter("ignore", DeprecationWarning)
        generator.main(["--config-file", str(GENERATOR_CONF), "--output-file", str(out)])

    fresh, committed = out.read_text(), CONF_SAMPLE.read_text()
    if fresh != committed:
        ours = set(conf_mod.GROUPS)
        new, old = sections(fresh), sections(committed)
        differ = sorted(name for name in set(new) | set(old) if new.get(name) != old.get(name))
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(True), fresh.splitlines(True),
            "committed/imagesync.conf.sample", "generated/imagesync.conf.sample"))[:80])
        who = ("imagesync's own options changed" if ours & set(differ) else
               f"only library sections differ (oslo.messaging {version('oslo.messaging')} is "
               "installed; a new release changes its options)")
        raise AssertionError(
            f"etc/imagesync/imagesync.conf.sample is out of date ({who}; sections: "
            f"{', '.join(differ)}). Run `tox -e genconfig` and commit the result.\n{diff}")


def test_the_config_sample_documents_every_imagesync_option_with_its_default():
    sample = CONF_SAMPLE.read_text()
    found = sections(sample)
    for group, opts in conf_mod.GROUPS.items():
        assert group in found, f"[{group}] missing from the sample"
        for opt in opts:
            documented = re.search(rf"^#{opt.dest} = ", found[group], re.MULTILINE)
            assert documented, f"[{group}] {opt.dest} missing from the sample"
    assert "transport_url" in found["DEFAULT"]
    assert "ssl" in found["oslo_messaging_rabbit"]  # RabbitMQ TLS is configured there


def test_the_config_sample_with_every_line_commented_out_loads_with_the_defaults(tmp_path):
    conf = conf_mod.load(config_files=[str(CONF_SAMPLE)])

    assert conf.metrics.enabled is False and conf.metrics.host == "127.0.0.1"
    assert isinstance(conf, cfg.ConfigOpts)


def test_the_policy_sample_is_valid_without_warnings_and_shows_every_matcher():
    policy = load_policy(ETC / "policy.yaml.sample")

    assert policy.warnings == ()
    rules = {rule.name: rule for rule in policy.rules}
    used = {m for m in MATCHERS for rule in policy.rules
            if getattr(rule, {"name": "name_globs"}.get(m, m))}
    assert used == set(MATCHERS)
    assert rules["public-everywhere"].stores is None            # stores: all
    assert rules["public-everywhere"].exclude_stores
    assert rules["public-everywhere"].description
    assert any(len(rule.name_globs or ()) > 1 for rule in policy.rules)   # a list of globs
    assert any(len(rule.name_globs or ()) == 1 for rule in policy.rules)  # a single glob
    quoted = dict(rules["windows-licensed"].properties)
    assert quoted["hw_qemu_guest_agent"] == ("yes",)          # quoted, so a string, not True
    assert quoted["os_version"] == ("2022", "2019")


def test_the_policy_sample_explains_why_property_values_are_quoted():
    text = (ETC / "policy.yaml.sample").read_text()

    assert re.search(r"QUOTE values that YAML would read", text)
    assert '"yes"' in text and '"20.10"' in text


def test_the_clouds_sample_is_an_application_credential_for_the_default_cloud_name():
    default_cloud = conf_mod.load(config_files=[]).imagesync.cloud
    sample = ETC / "clouds.yaml.sample"

    region = openstack.config.OpenStackConfig(
        config_files=[str(sample)], vendor_files=[], load_envvars=False).get_one(default_cloud)

    assert region.config["auth_type"] == "v3applicationcredential"
    auth = region.get_auth_args()
    assert set(auth) == {"auth_url", "application_credential_id",
                         "application_credential_secret"}
    assert auth["auth_url"].startswith("https://")
    assert auth["application_credential_secret"].startswith("REPLACE")
    assert region.region_name and region.get_interface() == "internal"
    assert region.config["cacert"] and region.get_requests_verify_args()[0] == \
        region.config["cacert"]
