"""Merchant config (CONTRACT.md section 4): strict parsing, offending key paths in the message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.merchant_config import ConfigError, load_config, parse_config, unlisted_endpoints

DIGEST = "a" * 64


def minimal(**merchant: Any) -> dict[str, Any]:
    return {"merchants": {"m_demo": {"api_key_sha256": DIGEST, "connectors": ["stripe"], **merchant}}}


def test_contract_example_parses(tmp_path: Path) -> None:
    document = minimal(
        mode="autonomous",
        connectors=["stripe", "adyen", "cybersource"],
        retry={"flows": ["retry_same", "cascade", "step_up", "clear_pan", "alternate_network"], "max_retries": 3},
        retarget={
            "enabled": True,
            "channels": ["whatsapp", "sms", "email"],
            "skip_days": 1,
            "retry_window_days": 7,
            "max_nudges": 4,
            "quiet_hours": {"start": "21:00", "end": "09:00", "timezone": "Asia/Kolkata"},
            "link_ttl_hours": 48,
        },
        webhook={"url": "https://merchant.example/winback", "secret_env": "WINBACK_WEBHOOK_SECRET_M_DEMO"},
        providers={
            "whatsapp": {
                "kind": "gupshup",
                "base_url": "https://api.gupshup.io",
                "api_key_env": "GUPSHUP_KEY",
                "source": "919000000000",
            },
            "email": {"kind": "smtp", "host": "localhost", "port": 1025, "sender": "pay@merchant.example"},
        },
        connector_endpoints={
            "stripe": {"kind": "sandbox"},
            "adyen": {"kind": "http", "base_url": "https://switch.merchant.example", "api_key_env": "SWITCH_KEY"},
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    merchant = config.merchants["m_demo"]
    assert merchant.retarget.quiet_hours.start_minute == 21 * 60
    assert merchant.retarget.quiet_hours.end_minute == 9 * 60
    assert merchant.connectors == ["stripe", "adyen", "cybersource"]


@pytest.mark.parametrize(
    ("merchant", "expected"),
    [
        ({"retry": {"max_retries": 3, "bogus": 1}}, "merchants.m_demo.retry.bogus: unknown key"),
        ({"mode": "manual"}, "merchants.m_demo.mode"),
        ({"retry": {"flows": ["initial"]}}, "merchants.m_demo.retry.flows: Value error, not a silent-retry flow"),
        ({"retarget": {"channels": ["fax"]}}, "merchants.m_demo.retarget.channels.0"),
        (
            {"retarget": {"quiet_hours": {"start": "9pm", "end": "09:00", "timezone": "UTC"}}},
            "merchants.m_demo.retarget.quiet_hours.start: Value error, expected HH:MM",
        ),
        (
            {"retarget": {"quiet_hours": {"start": "21:00", "end": "09:00", "timezone": "Mars/Base"}}},
            "unknown IANA timezone 'Mars/Base'",
        ),
        ({"connector_endpoints": {"adyen": {"kind": "http"}}}, "kind 'http' needs base_url"),
        ({"retry": {"max_retries": -1}}, "merchants.m_demo.retry.max_retries"),
    ],
)
def test_bad_config_names_the_key_path(merchant: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(minimal(**merchant))
    assert expected in str(excinfo.value)


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    # Both used to escape load_config as IsADirectoryError / UnicodeDecodeError: `winback serve` and `executor run`
    # turn only a ConfigError into their one-line reason, so each ended in a traceback.
    folder = tmp_path / "merchants.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"merchants\.yaml: cannot read the config file: Is a directory"):
        load_config(folder)
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("merchants: {}\n", encoding="utf-16")  # as Windows tools often save it
    with pytest.raises(ConfigError, match=r"utf16\.yaml: not UTF-8 text \(invalid start byte at byte 0\)"):
        load_config(utf16)


def test_top_level_unknown_key_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="surprise: unknown key"):
        parse_config({**minimal(), "surprise": True})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("merchants: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


_KEY_A = "a" * 64
_KEY_B = "b" * 64


def test_a_merchant_listed_twice_is_refused_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    # YAML keeps the last of two equal keys silently: the second block replaced the first without a word.
    config = tmp_path / "merchants.yaml"
    config.write_text(
        "merchants:\n"
        f"  m_demo:\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n"
        f"  m_demo:\n    api_key_sha256: {_KEY_B}\n    connectors: [adyen]\n    retry: {{max_retries: 1}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    assert str(refused.value).startswith(f"{config}: duplicate key merchants.m_demo on lines 2 and 5: ")
    config.write_text(
        f"merchants:\n  m_demo:\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n"
        "    retry: {max_retries: 1, max_retries: 3}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"duplicate key merchants\.m_demo\.retry\.max_retries on lines 5 and 5"):
        load_config(config)


def test_a_key_written_twice_deep_in_a_merchant_is_refused_naming_its_path_and_both_lines(tmp_path: Path) -> None:
    """It named the key alone ('max_retries' on line 8, first on line 6): with several merchants, each with a retry
    and a retarget block, which one was left to guess."""
    config = tmp_path / "merchants.yaml"
    merchant = f"    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n"
    cases = {
        # Two retarget blocks: the second replaced the first, quiet hours and all.
        "    retarget:\n      enabled: true\n      quiet_hours: {start: '21:00', end: '09:00', timezone: UTC}\n"
        "    retry: {max_retries: 2}\n"
        "    retarget:\n      enabled: false\n": "merchants.m_demo.retarget on lines 5 and 9",
        "    retry:\n      max_retries: 3\n      flows: [retry_same]\n      max_retries: 1\n": (
            "merchants.m_demo.retry.max_retries on lines 6 and 8"
        ),
        # In a list's item, the item's index is part of the path (the validation's paths write it so too).
        "    retry: {flows: [{a: 1, a: 2}]}\n": "merchants.m_demo.retry.flows.0.a on lines 5 and 5",
        # The top level itself.
        "merchants: {}\n": "merchants on lines 1 and 5",
    }
    for written, named in cases.items():
        config.write_text(f"merchants:\n  m_demo:\n{merchant}{written}", encoding="utf-8")
        with pytest.raises(ConfigError) as refused:
            load_config(config)
        assert str(refused.value) == (
            f"{config}: duplicate key {named}: YAML would keep the last and drop the first without a word; write the "
            "key once"
        ), written


def test_a_merge_key_may_be_overridden_and_an_alias_is_checked_once(tmp_path: Path) -> None:
    """``<<: *base`` then a key of base written again is YAML's override, not a repeat; an anchored mapping that
    repeats a key is refused where the anchor is; an alias of its own anchor ends the walk."""
    config = tmp_path / "merchants.yaml"
    base = f"api_key_sha256: {_KEY_A}, connectors: [stripe], retry: {{max_retries: 3}}"
    config.write_text(
        f"base: &base {{{base}}}\nmerchants:\n  m_demo:\n    <<: *base\n    retry: {{max_retries: 1}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"^[^:]*merchants\.yaml: base: unknown key$"):  # past the duplicate check
        load_config(config)
    config.write_text(
        f"base: &base {{{base}, connectors: [adyen]}}\nmerchants:\n  m_demo: *base\n  m_other: *base\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"duplicate key base\.connectors on lines 1 and 1"):
        load_config(config)
    config.write_text("merchants: &loop\n  m_demo: *loop\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"merchants\.m_demo"):  # refused by validation, not looping
        load_config(config)


def test_two_merchants_with_one_api_key_are_refused(tmp_path: Path) -> None:
    # The key would answer for whichever merchant the server matched first, and lock the other out.
    raw = {"merchants": {name: {"api_key_sha256": _KEY_A, "connectors": ["stripe"]} for name in ("m_a", "m_b")}}
    with pytest.raises(ConfigError, match=r"merchants\.m_b\.api_key_sha256: the same key as merchant 'm_a'"):
        parse_config(raw)
    raw["merchants"]["m_b"]["api_key_sha256"] = _KEY_B
    assert set(parse_config(raw).merchants) == {"m_a", "m_b"}


@pytest.mark.parametrize(
    ("block", "path", "reason"),
    [
        ({"retry": {"max_retries": True}}, "retry.max_retries", "valid integer"),
        ({"retarget": {"skip_days": 2.0}}, "retarget.skip_days", "valid integer"),
        ({"retarget": {"enabled": "yes"}}, "retarget.enabled", "valid boolean"),
        ({"connectors": ["stripe", " Stripe"]}, "connectors", "listed twice"),
        ({"connectors": ["stripe", "  "]}, "connectors", "empty"),
        ({"connectors": ["stripe", "c" * 129]}, "connectors.1", "at most 128 characters"),
        ({"webhook": {"url": "not a url", "secret_env": "X"}}, "webhook.url", "http(s) URL"),
        ({"providers": {"sms": {"kind": "gupshup", "base_url": "api.gupshup.io"}}}, "providers.sms.base_url", "URL"),
        ({"providers": {"email": {"kind": "smtp", "port": 70000}}}, "providers.email.port", "65535"),
        (
            {"providers": {"email": {"kind": "smtp", "max_per_second": 0}}},
            "providers.email.max_per_second",
            "greater than 0",
        ),
        (
            {"providers": {"email": {"kind": "smtp", "max_per_second": "14"}}},
            "providers.email.max_per_second",
            "number",
        ),
        (
            {"providers": {"email": {"kind": "smtp", "max_per_second": True}}},
            "providers.email.max_per_second",
            "number",
        ),
        (
            {"connector_endpoints": {"stripe": {"kind": "sandbox", "timeout_seconds": True}}},
            "connector_endpoints.stripe.timeout_seconds",
            "valid number",
        ),
        (
            {"connector_endpoints": {"stripe": {"kind": "sandbox", "timeout_seconds": "10"}}},
            "connector_endpoints.stripe.timeout_seconds",
            "valid number",
        ),
    ],
)
def test_values_yaml_or_pydantic_would_bend_are_refused_naming_the_key(
    block: dict[str, Any], path: str, reason: str
) -> None:
    # Each used to start: max_retries true as 1, a connector twice in the pecking order, a webhook to "not a url".
    merchant = {"api_key_sha256": _KEY_A, "connectors": ["stripe"]} | block
    with pytest.raises(ConfigError, match=rf"merchants\.m\.{re.escape(path)}: .*{re.escape(reason)}"):
        parse_config({"merchants": {"m": merchant}})


def test_a_config_without_merchants_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"merchants: .*at least 1 item"):
        parse_config({"merchants": {}})


def test_yaml_merge_keys_still_load_and_may_be_overridden(tmp_path: Path) -> None:
    # The duplicate-key check must not take "<<: *base" for a key, nor a key overriding the merged one for a repeat.
    config = tmp_path / "merchants.yaml"
    config.write_text(
        f"merchants:\n  m_a: &base\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n"
        "    retry: {max_retries: 2}\n"
        f"  m_b:\n    <<: *base\n    api_key_sha256: {_KEY_B}\n    retry: {{max_retries: 1}}\n",
        encoding="utf-8",
    )
    merchants = load_config(config).merchants
    assert merchants["m_b"].connectors == ["stripe"]
    assert (merchants["m_a"].retry.max_retries, merchants["m_b"].retry.max_retries) == (2, 1)
    assert merchants["m_b"].api_key_sha256 == _KEY_B


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            "    retarget:\n      on: true\n",  # YAML 1.1 read the key `on` as True, reported as "retarget.1"
            r"merchants\.m\.retarget\.on: unknown key",
        ),
        ("    retarget:\n      enabled: no\n", r"merchants\.m\.retarget\.enabled: Input should be a valid boolean"),
        ("    retarget:\n      enabled: off\n", r"merchants\.m\.retarget\.enabled: Input should be a valid boolean"),
        ("    retry: {max_retries: 010}\n", r"retry\.max_retries: Input should be a valid integer"),  # was octal 8
        ("    retarget: {channels: [sms, whatsapp, sms]}\n", r"retarget\.channels: .*channel listed twice: sms"),
        ("    retry: {flows: [cascade, step_up, cascade]}\n", r"retry\.flows: .*flow listed twice: cascade"),
        (
            "    webhook: {url: 'https://merchant.example/hook', secret_env: ''}\n",
            r"webhook\.secret_env: .*environment variable's name",
        ),
        (
            "    providers: {sms: {kind: gupshup, api_key_env: 'GUPSHUP KEY'}}\n",
            r"providers\.sms\.api_key_env: .*environment variable's name",
        ),
        (
            "    retarget: {quiet_hours: {start: '21:00', end: '09:00', timezone: localtime}}\n",
            r"quiet_hours\.timezone: .*'localtime' is not an IANA place name",
        ),
        (
            "    retarget: {quiet_hours: {start: '21:00', end: '09:00', timezone: posix/Asia/Kolkata}}\n",
            r"quiet_hours\.timezone: .*not an IANA place name",
        ),
    ],
)
def test_what_yaml_would_read_as_something_else_is_refused_naming_the_key(
    tmp_path: Path, block: str, message: str
) -> None:
    # Each used to load: `on:` as a key `True`, `no` as false, a channel twice in the order, a webhook secret read
    # from the variable named "", quiet hours in whatever zone the host happened to be set to.
    config = tmp_path / "merchants.yaml"
    config.write_text(f"merchants:\n  m:\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n{block}")
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_true_and_false_are_switches_in_any_case_and_other_words_stay_text(tmp_path: Path) -> None:
    config = tmp_path / "merchants.yaml"
    config.write_text(
        f"merchants:\n  m:\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe, 'no', yes]\n"
        "    retarget: {enabled: False}\n"
    )
    merchant = load_config(config).merchants["m"]
    assert merchant.retarget.enabled is False
    assert merchant.connectors == ["stripe", "no", "yes"]


def test_unquoted_times_are_times_not_base_60_numbers(tmp_path: Path) -> None:
    # YAML 1.1 read 21:00 as the integer 1260 (sexagesimal), refused as "not a valid string": the times had to be
    # quoted, against what a reader expects.
    config = tmp_path / "merchants.yaml"
    config.write_text(
        f"merchants:\n  m:\n    api_key_sha256: {_KEY_A}\n    connectors: [stripe]\n"
        "    retry: {max_retries: 2}\n"
        "    retarget: {max_nudges: 0x3, quiet_hours: {start: 21:00, end: 08:30, timezone: Europe/London}}\n"
    )
    merchant = load_config(config).merchants["m"]
    assert (merchant.retarget.quiet_hours.start, merchant.retarget.quiet_hours.end) == ("21:00", "08:30")
    assert (merchant.retry.max_retries, merchant.retarget.max_nudges) == (2, 3)


@pytest.mark.parametrize(("text", "message"), [("", "the config is empty"), ("- a\n", "the file's top level: ")])
def test_an_empty_or_listed_file_is_refused_in_words(tmp_path: Path, text: str, message: str) -> None:
    # An empty file used to say ": Input should be a valid dictionary", with no path to read.
    config = tmp_path / "merchants.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_connector_endpoints_name_each_connector_once_and_unlisted_ones_are_named() -> None:
    """Two ``connector_endpoints`` keys for one connector (``adyen`` and ``Adyen``) were accepted, and which entry a
    charge used depended on how its decision spelt the connector: now refused with the key's path. A key naming
    none of the merchant's ``connectors`` (``adyn`` for ``adyen``) was accepted silently, leaving adyen's silent retries
    to the sandbox or the dead-letter queue; requests' ``available_connectors`` may name connectors outside the
    config (CONTRACT.md section 2), so it stays valid but is named for the executor's start-up warning."""
    switch = {"kind": "http", "base_url": "https://switch.merchant.example", "api_key_env": "SWITCH_KEY"}
    twice = minimal(connectors=["stripe", "adyen"], connector_endpoints={"adyen": switch, "Adyen": switch})
    with pytest.raises(ConfigError, match=r"merchants\.m_demo\.connector_endpoints: .*'Adyen' and 'adyen' are one"):
        parse_config(twice)
    typo = parse_config(
        minimal(connectors=["stripe", "adyen"], connector_endpoints={"Stripe ": {"kind": "sandbox"}, "adyn": switch})
    )
    assert unlisted_endpoints(typo) == ["merchants.m_demo.connector_endpoints.adyn (its connectors: stripe, adyen)"]
    fixed = parse_config(minimal(connectors=["stripe", "adyen"], connector_endpoints={"Adyen": switch}))
    assert unlisted_endpoints(fixed) == []
