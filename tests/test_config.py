"""Unit tests: the shipped example config is valid and means what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.yaml.example"


def test_example_config_is_valid_and_uses_the_defaults_it_shows():
    config = load_config(EXAMPLE)
    defaults = Config()
    assert config.nats.url == "embedded"
    for section in ("server", "nats", "forwarding", "stats", "logging", "ingress", "admin"):
        assert getattr(config, section) == getattr(defaults, section), section
    assert config.endpoints_by_domain()["vietanh.cloudgo.vn"][0].url == "http://127.0.0.1:9000/webhook"


@pytest.mark.parametrize("domain", ["..", "a..vn", "_", ".ok.vn", "ok.-.vn"])
def test_routes_and_api_keys_refuse_the_domains_the_ingress_refuses(tmp_path: Path, domain: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"routes": [{"domain": domain, "endpoints": ["http://127.0.0.1:9000/"]}]}))
    with pytest.raises(ConfigError, match=r"routes\[0\]\.domain: domain .* needs a letter or digit in every"):
        load_config(path)
    key = {"name": "k", "sha256": "0" * 64, "domains": ["ok.vn", domain]}
    path.write_text(yaml.safe_dump({"ingress": {"api_keys": [key]}}))
    with pytest.raises(ConfigError, match=r"ingress\.api_keys\[0\]\.domains: domain .* needs a letter or digit"):
        load_config(path)


def test_the_webhook_transport_is_lean_unless_httpx_is_chosen(tmp_path: Path):
    assert Config().forwarding.http_transport == "lean"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"forwarding": {"http_transport": "httpx"}, "routes": []}))
    assert load_config(path).forwarding.http_transport == "httpx"
    path.write_text(yaml.safe_dump({"forwarding": {"http_transport": "curl"}, "routes": []}))
    with pytest.raises(ConfigError, match=r"forwarding\.http_transport: Input should be 'lean' or 'httpx'"):
        load_config(path)
