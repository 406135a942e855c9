"""Compression methods register themselves: a method defined in a new module (here, this
test file) with `registration.register` is found by `registry.build`, listed in METHODS,
LABELS and SETTINGS, and taken by the command line's `--method`, with no other edit."""

from __future__ import annotations

import dataclasses

import pytest

from earlytom_jax.architectures import architecture
from earlytom_jax.compression import defaults, registration, registry
from earlytom_jax.compression.base import NoHooks
from earlytom_jax.errors import ConfigError


@pytest.fixture
def plugin(monkeypatch):
    """A method registered from outside the package; the registrations are restored after."""
    monkeypatch.setattr(registration, "TABLE", dict(registration.TABLE))

    @registration.register(name="keep_first", label="keep first", settings=("frames",))
    @dataclasses.dataclass(frozen=True)
    class KeepFirst(NoHooks):
        """Keeps the first `frames` input frames; `ratio` is carried, unused."""

        ratio: float = registration.DEFAULT_RATIO
        frames: int = 1

        def __post_init__(self):
            registration.check_ratio(self.ratio)

        def input_frames(self, t0: int) -> tuple[int, ...]:
            return tuple(range(min(self.frames, t0)))

    return KeepFirst


def test_a_method_registered_elsewhere_is_built_and_listed(plugin):
    cfg = architecture("tiny")
    m = registry.build("Keep-First", 0.3, cfg, frames=2)
    assert m == plugin(ratio=0.3, frames=2) and m.input_frames(8) == (0, 1)
    assert registry.METHODS[-1] == "keep_first" and registry.METHODS[:2] == ("full", "earlytom")
    assert registry.LABELS["keep_first"] == "keep first" == registry.label(m)
    assert registry.SETTINGS["keep_first"] == ("frames",)
    with pytest.raises(ConfigError, match="outside"):
        registry.build("keep_first", 1.5, cfg)
    with pytest.raises(ConfigError, match="takes no setting tau"):
        registry.build("keep_first", 0.3, cfg, tau=0.5)


def test_the_command_line_takes_a_registered_method(plugin):
    from earlytom_jax import cli
    from earlytom_jax.cli.flags import method_from_args

    cfg = architecture("tiny")
    args = cli.build_parser().parse_args(["run", "--model", "m", "--video", "v", "--prompt", "p",
                                          "--method", "keep_first", "--ratio", "0.4"])
    assert method_from_args(args, cfg) == plugin(ratio=0.4)
    args = cli.build_parser().parse_args(["run", "--model", "m", "--video", "v", "--prompt", "p", "--method", "keep_first"])
    assert method_from_args(args, cfg) == plugin(ratio=registration.DEFAULT_RATIO)


def test_the_registrations_are_restored(plugin):
    assert "keep_first" in registry.METHODS


def test_no_leftover_registration():
    assert "keep_first" not in registry.METHODS


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        @registration.register(name="earlytom", label="another")
        class Other(NoHooks):
            pass


def test_one_default_ratio_and_one_range_check():
    from earlytom_jax.compression.earlytom import EarlyTom
    from earlytom_jax.compression.tome import ToMe
    from earlytom_jax.compression.uniform import UniformFrames, UniformTokens
    from earlytom_jax.compression.visionzip import VisionZip

    for cls in (EarlyTom, ToMe, UniformFrames, UniformTokens, VisionZip):
        assert cls().ratio == registry.DEFAULT_RATIO == 0.1, cls
        with pytest.raises(ConfigError, match=r"ratio 0.0 is outside \(0, 1\]"):
            cls(ratio=0.0)
    assert registry.default_ratio() == 0.1 and registry.default_ratio("videomme") == 0.1
    assert registry.default_ratio("videomme@0.15") == 0.15


def test_results_name_each_method_by_its_registry_name():
    """Eval results record the method's registry name (EarlyTom was written "full": every
    method inherited NoHooks' name)."""
    from earlytom_jax.architectures import architecture
    from earlytom_jax.evals.runner import method_description

    cfg = architecture("tiny")
    for name in ("full", "earlytom", "fastv", "visionzip", "tome"):
        method = registry.build(name, None if name == "full" else 0.25, cfg,
                                **({} if name == "full" else defaults.settings(name, cfg)[0]))
        assert registry.name(method) == name
        assert method_description(method)["name"] == name


_NEW_METHOD_FILE = '''
import dataclasses

from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.registration import register


@register(name="keep_all_test", label="keep all (test)", takes_ratio=False)
@dataclasses.dataclass(frozen=True)
class KeepAll(NoHooks):
    pass
'''


def test_a_new_file_in_the_compression_package_is_found_without_other_edits(tmp_path, monkeypatch):
    """Adding a method is one new module in earlytom_jax/compression: the registry imports every
    module of the package (here the package's path gains a folder holding the new file)."""
    import importlib
    import sys

    import earlytom_jax.compression as package

    (tmp_path / "keep_all_test_method.py").write_text(_NEW_METHOD_FILE)
    monkeypatch.setattr(package, "__path__", list(package.__path__) + [str(tmp_path)])
    try:
        importlib.reload(registry)
        assert "keep_all_test" in registry.METHODS
        assert registry.METHODS[-1] == "keep_all_test"  # after the built-in ones
        method = registry.build("keep_all_test", None, architecture("tiny"))
        assert registry.label(method) == "keep all (test)"
    finally:
        registration.TABLE.pop("keep_all_test", None)
        sys.modules.pop("earlytom_jax.compression.keep_all_test_method", None)
        monkeypatch.undo()
        importlib.reload(registry)
    assert "keep_all_test" not in registry.METHODS
