"""Per-method defaults (edgemole/defaults.py): a value from the config file or a flag wins, else the method's
default, else the dataclass default; the line simulate and bench print says which applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemole.config import Settings, load_settings_with_defaults
from edgemole.defaults import METHOD_DEFAULTS, TUNABLE, AppliedDefaults


def test_every_default_is_a_known_setting_of_a_known_method() -> None:
    from aggregator.strategies import strategy_class

    for method, values in METHOD_DEFAULTS.items():
        strategy_class(method)
        assert set(values) <= set(TUNABLE)
        for key in values:
            section, name = key.split(".")
            assert hasattr(getattr(Settings(), section), name)


def test_precedence_config_then_flag_then_method_default(tmp_path: Path) -> None:
    settings, applied = load_settings_with_defaults(None, {"fleet": {"method": "fedamole-a2"}})
    assert (settings.train.lr, settings.a2.b_lr_multiplier) == (0.01, 1.0)  # the method's
    assert settings.train.local_steps == 10  # no method default: the dataclass's
    assert applied.line() == ("fedamole-a2 defaults: train.lr=0.01 a2.b_lr_multiplier=1 amole.reassign_every=2 "
                              "amole.keep_bonus=1")

    config = tmp_path / "c.toml"
    config.write_text('[fleet]\nmethod = "lora-a2"\n[train]\nlr = 0.003\n')
    settings, applied = load_settings_with_defaults(config, {})
    assert (settings.train.lr, settings.a2.b_lr_multiplier) == (0.003, 1.0)  # the config wins
    assert applied.line() == "lora-a2 defaults: a2.b_lr_multiplier=1 (set in config: train.lr)"

    settings, applied = load_settings_with_defaults(config, {"a2": {"b_lr_multiplier": 4.0}, "train": {"lr": None}})
    assert (settings.train.lr, settings.a2.b_lr_multiplier) == (0.003, 4.0)  # a flag wins; None is no flag
    assert applied.line() == "lora-a2 defaults: none applied (set in config: train.lr a2.b_lr_multiplier)"

    settings, _ = load_settings_with_defaults(None, {"fleet": {"method": "fedit"}})
    assert settings.train.lr == 0.01 and settings.a2.b_lr_multiplier == 5.0  # fedit has no B multiplier default


def test_line_is_empty_without_defaults() -> None:
    assert AppliedDefaults("custom").line() == ""


def test_simulate_prints_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The line comes before anything runs (here the run stops at a bad engine, after the settings loaded)."""
    from fleet.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--method", "fedamole", "--engine", "warp"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out.strip() == "fedamole defaults: train.lr=0.005" and "unknown engine 'warp'" in err
