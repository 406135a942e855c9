"""The flags several subcommands share: list parsers, the compression flags, and the method
they build (through the registry: a flag sets whatever setting of that name a method takes)."""

from __future__ import annotations

import argparse
import sys

from earlytom_jax.compression import registry


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states one or there
    is none to state (None, False, a required option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or action.required or "default" in text.lower()
                or not action.option_strings):
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, (tuple, list)) else action.default
        return f"{text} (default: {str(default).replace('%', '%%') if default != '' else chr(39) * 2})".lstrip()


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names (methods), blanks dropped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def video_flags(p: argparse.ArgumentParser) -> None:
    """Qwen2.5-VL's frame size bounds (the official EarlyTom script's by default)."""
    from earlytom_jax.video_qwen import QwenVideoSettings

    d = QwenVideoSettings()
    g = p.add_argument_group("Qwen2.5-VL video (ignored by LLaVA-OneVision, which resizes to its square)")
    g.add_argument("--min-pixels", type=int, default=d.min_pixels, help="smallest frame area: frames are resized "
                   "(sides multiples of 28, aspect kept) to at least this many pixels")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest frame area, in pixels")
    v = p.add_argument_group("LLaVA-Video (lmms-eval llava_vid: one frame a second, at most --frames)")
    v.add_argument("--time-instruction", action="store_true", help="open the question with the video's length and "
                   "the sampled frames' times (llava_vid's add_time_instruction; off in the paper's runs)")


def video_settings(args):
    """The `QwenVideoSettings` of --frames, --min-pixels and --max-pixels (ConfigError, one line,
    for bounds that contradict each other)."""
    from earlytom_jax.video_qwen import QwenVideoSettings

    return QwenVideoSettings(frames=getattr(args, "frames", None) or QwenVideoSettings.frames,
                             min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def siglip_head_flag(p: argparse.ArgumentParser) -> None:
    """--siglip-head DIR: the original SigLIP beside the tower, for FastVID's official signals."""
    p.add_argument("--siglip-head", default=None, metavar="DIR",
                   help="LLaVA-OneVision/LLaVA-Video: a directory of the original SigLIP (google/siglip-so400m-patch14-384, "
                        "HF layout, safetensors) whose post-LayerNorm and attention-pooling head give FastVID its "
                        "official signals (without it: the tower's own frame means and last-block attention)")


DEFAULT_METHOD = "earlytom"  # --method when not given, on every family


def compression_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--method", default=None, choices=list(registry.METHODS),
                   help="compression method; every one keeps --ratio of the T0·196 visual tokens "
                        "(Qwen2.5-VL: of its merged tokens; fastv: from LLM layer --llm-merge-layer on) "
                        "(default: earlytom)")
    g.add_argument("--ratio", type=float, default=None,
                   help=f"retention ratio r in (0, 1] (default {registry.DEFAULT_RATIO}, or --preset TASK@R's)")
    g.add_argument("--tau", type=float, default=None, help="segmentation threshold τ in [0, 1] (EarlyTom: default 0.6, or --preset's; "
                   "HoliTom: 0.65 at r <= 0.1, else 0.8)")
    g.add_argument("--layers", type=ints, default=None, help="SigLIP blocks after which frames merge, e.g. 6,21,23 (default: --preset's, else the "
                        "checkpoint's own, else 6,21,23, scaled to a shallower encoder)")
    g.add_argument("--llm-merge-layer", type=int, default=None, help="stage III layer k (EarlyTom) or FastV's layer K; -1 turns stage III off (default: --preset's, "
                        "else the checkpoint's own, else 18 for EarlyTom and 2 for FastV, scaled to a shallower LLM)")
    g.add_argument("--llm-merge-ratio", type=float, default=None, help="stage III drop ratio (default 0.5, or --preset's)")
    g.add_argument("--llm-noncausal", action="store_true", help="layer k-1 without causal mask in prefill, as the official code")
    g.add_argument("--paper-prose", action="store_true", help="follow the paper's prose where the official code differs")
    g.add_argument("--preset", default=None, help="published settings: TASK or TASK@RATIO, e.g. videomme@0.1")
    g.add_argument("--set", dest="method_set", action="append", default=None, metavar="METHOD.KEY=VALUE",
                   help="any registered setting of a method, e.g. holitom.d=0.5, fastvid.signals=tower, "
                        "prunevid.cluster_ratio=0.4 (repeatable; wins over the flags above; a wrong key "
                        "lists the method's settings)")


def ratio_from_args(args) -> float:
    """--ratio, else the ratio of --preset TASK@R, else the one default (`registry.default_ratio`)."""
    return args.ratio if args.ratio is not None else registry.default_ratio(args.preset)


# compression flag → the settings it sets, the first of them that a method takes
FLAG_SETTINGS = (("tau", ("tau",)), ("layers", ("layers",)), ("llm_merge_layer", ("llm_layer", "layer")),
                 ("llm_merge_ratio", ("llm_ratio",)), ("preset", ("preset",)))


_PRINTED: set[str] = set()


def method_from_args(args, cfg, name: str | None = None, ratio: float | None = None, info=None,
                     notes: list | None = None):
    """The method `name` (default --method) at `ratio` (default from the flags), built by the
    registry with the settings `compression.defaults.settings` picks, in its one precedence:
    the compression flags that apply to it (the settings it takes, `registry.SETTINGS`), then
    --preset, then the checkpoint's defaults (`info`, a `defaults.ModelInfo`), then the
    built-in ones scaled to the model's depth. Notes (a default scaled) are appended to
    `notes` when given, else printed on stderr, each once."""
    from earlytom_jax.compression import defaults
    from earlytom_jax.pipeline import check_family

    name = registry.canonical(name or args.method or DEFAULT_METHOD)
    if name == "full":
        return registry.build("full", None, cfg)
    takes = registry.SETTINGS[name]
    explicit: dict = {}
    if "llm_noncausal" in takes:
        explicit["llm_noncausal"] = args.llm_noncausal
    if "quirks" in takes:
        explicit["quirks"] = not args.paper_prose
    for flag, keys in FLAG_SETTINGS:
        key = next((k for k in keys if k in takes), None)
        if key is not None and key != "preset":
            explicit[key] = getattr(args, flag)
    explicit.update(set_flags(getattr(args, "method_set", None)).get(name, {}))
    kw, said = defaults.settings(name, cfg, explicit, args.preset, info)
    method = registry.build(name, ratio if ratio is not None else ratio_from_args(args), cfg, **kw)
    check_family(cfg, method)  # before any note about its settings
    if notes is not None:
        notes.extend(said)
    else:
        for line in said:
            if line not in _PRINTED:  # once per process (bench and eval build a method per ratio)
                _PRINTED.add(line)
                print(line, file=sys.stderr)
    return method


def set_flags(items) -> dict[str, dict]:
    """--set METHOD.KEY=VALUE items → {method: {key: value}}, each value parsed as the type of
    the setting's default (bool: true/false/1/0; a tuple: comma-separated; None: a number if it
    reads as one, else the text). ConfigError (one line) for an unknown method or setting, or a
    value that does not parse."""
    import dataclasses

    from earlytom_jax.compression import registration
    from earlytom_jax.errors import ConfigError

    out: dict[str, dict] = {}
    for item in items or ():
        head, eq, text = item.partition("=")
        method, dot, key = head.strip().partition(".")
        if not (eq and dot and method and key):
            raise ConfigError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. holitom.d=0.5")
        try:
            name = registry.canonical(method)
        except (KeyError, ValueError, ConfigError):
            raise ConfigError(f"--set {item!r}: unknown method {method!r}; methods: {', '.join(registry.METHODS)}") from None
        takes = registry.SETTINGS[name]
        if key not in takes:
            raise ConfigError(f"--set {item!r}: {name} has no setting {key!r}; its settings: {', '.join(takes) or 'none'}")
        fields = {f.name: f for f in dataclasses.fields(registration.TABLE[name].cls)}
        default = fields[key].default if key in fields else None
        out.setdefault(name, {})[key] = _parse_setting(item, text.strip(), default)
    return out


def check_set(args) -> None:
    """--set checked before anything is loaded: well formed, known settings, and each for a
    method the command runs (--method, eval's --compare or bench's --methods, where given)."""
    from earlytom_jax.errors import ConfigError

    items = getattr(args, "method_set", None)
    given = set_flags(items)
    chosen = getattr(args, "methods", None) or getattr(args, "compare", None)
    if chosen is None and hasattr(args, "method"):
        chosen = [args.method or DEFAULT_METHOD]
    if chosen is None or not given:
        return
    runs = set(registry.resolve([str(c).partition("@")[0] for c in chosen]))  # bench: NAME@RATIO
    for name in given:
        if name not in runs:
            item = next(i for i in items if registry.canonical(i.partition(".")[0].strip()) == name)
            raise ConfigError(f"--set {item!r}: {name} is not among the methods this command runs ({', '.join(sorted(runs))})")


def _parse_setting(item: str, text: str, default):
    from earlytom_jax.errors import ConfigError

    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else int
            return tuple(kind(x) for x in text.split(",") if x.strip())
        if isinstance(default, (int, float, str)):
            return type(default)(text)
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    except ValueError:
        want = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
        raise ConfigError(f"--set {item!r}: {text!r} is not {want}") from None


def check_counts(args) -> None:
    """--frames and --max-new-tokens (where the command has them) at least 1, and --set
    (`check_set`): checked before anything is loaded."""
    from earlytom_jax.errors import ConfigError

    if getattr(args, "frames", None) is not None and args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: need at least 1")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: need at least 1 (the first token is the answer's start)")
    check_set(args)
