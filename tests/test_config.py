"""Unit tests: the shipped example config is valid and means what the README says."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.yaml.example"


def test_example_config_is_valid_and_uses_the_defaults_it_shows():
    config = load_config(EXAMPLE)
    defaults = Config()
    assert config.nats.url == "embedded"
    for section in ("server", "nats", "forwarding", "stats", "logging", "ingress", "admin"):
        assert getattr(config, section) == getattr(defaults, section), section
    assert config.endpoints_by_domain()["vietanh.cloudgo.vn"][0].url == "http://127.0.0.1:9000/webhook"
