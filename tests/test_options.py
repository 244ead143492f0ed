"""ngexp.options: what a check sees, and registrations that would replace one another."""

from __future__ import annotations

from typing import Any

import pytest

from ngexp.errors import OptionError
from ngexp.options import REGISTRY, check, checked, configurable


class Base:
    def __init__(self, *, width: int = 8, depth: int = 2) -> None:
        self.width, self.depth = width, depth


def check_child(width: int, depth: int, scale: float, **_: Any) -> None:
    check(width * depth <= 64 * scale, "width", width, f"width x depth <= {64 * scale}")


@checked(check_child)
class Child(Base):
    def __init__(self, scale: float = 1.0, **options: Any) -> None:
        super().__init__(**options)


def test_a_subclass_check_sees_the_inherited_defaults() -> None:
    """``width`` and ``depth`` come through ``**options``: absent from the call, their defaults
    (8, 2) reach the check, and given values replace them."""
    Child()
    Child(width=32)  # 32 x 2 <= 64
    with pytest.raises(OptionError, match="width=64 is invalid"):
        Child(width=64)
    with pytest.raises(OptionError, match="width=8 is invalid"):
        Child(scale=0.2)  # 8 x 2 > 12.8


def test_a_name_taken_by_another_target_is_refused() -> None:
    try:
        configurable("model", "test_options_net")(Base)
        configurable("model", "test_options_net")(Base)  # the same target again: fine
        with pytest.raises(OptionError, match="model/test_options_net is registered already"):
            configurable("model", "test_options_net")(Child)
    finally:
        REGISTRY["model"].pop("test_options_net", None)


def test_plugins_come_from_entry_points_unless_disabled_and_from_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ngexp.plugins import declared

    monkeypatch.setenv("NGEXP_PLUGINS", "json, ngexp_example ,")
    found = declared()
    assert ("NGEXP_PLUGINS", "json") in found
    modules = [module for _, module in found]
    assert modules.count("ngexp_example") == 1  # an entry point's module is listed once
    monkeypatch.setenv("NGEXP_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert declared() == [("NGEXP_PLUGINS", "json"), ("NGEXP_PLUGINS", "ngexp_example")]
