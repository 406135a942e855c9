"""A stacked-bar PNG of the TTFT breakdown per method and ratio (`earlytom bench --chart`),
drawn with Pillow only.

One bar per measured method and ratio: vision encoding, visual-token processing and LLM
prefill + first token stacked (the staged run's times), each segment labelled with its value,
the fused TTFT mean marked by a tick at the bar's right edge (the stages add two host round
trips); the PyTorch reference, when measured, is
one more bar of its TTFT. Labelled axes, a legend, a title; written atomically.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from earlytom_jax.io_utils import atomic_write_bytes

SIZE = (1000, 560)
STAGES = (("vision", "vision encoding", (66, 133, 244)), ("tokens", "visual-token processing", (251, 188, 5)),
          ("llm", "LLM prefill + first token", (52, 168, 83)))
TOTAL = ("TTFT (no breakdown)", (150, 150, 150))
REFERENCE = ("PyTorch full tokens (TTFT)", (219, 68, 55))
TICK = ("fused TTFT mean (tick)", (30, 30, 30))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _nice_step(top: float) -> float:
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def bars_of(results, reference: dict | None = None) -> list[dict]:
    """The bars to draw: {"label", "segments": [(key, seconds)], "ttft": seconds}."""
    bars = []
    for r in results:
        label = r.method if r.ratio is None else f"{r.method} r={r.ratio:g}"
        st = r.stages_s or {}
        segs = [(k, float(st[k])) for k, _, _ in STAGES if k in st]
        bars.append({"label": label, "segments": segs or [("total", r.ttft_mean)], "ttft": r.ttft_mean})
    if reference:
        bars.append({"label": "PyTorch full", "segments": [("reference", reference["ttft_mean_s"])],
                     "ttft": reference["ttft_mean_s"]})
    return bars


def _wrap(d, label: str, width: float, font) -> list[str]:
    """`label` in lines no wider than `width` where it can break: at spaces, and after "_"."""
    pieces = label.replace("_", "_\n").replace(" ", " \n").split("\n")
    lines = [""]
    for piece in pieces:
        if lines[-1] and d.textlength((lines[-1] + piece).rstrip(), font=font) > width:
            lines.append("")
        lines[-1] += piece
    return [line.rstrip() for line in lines]


def render(results, reference: dict | None = None, title: str = "", size: tuple[int, int] = SIZE) -> Image.Image:
    bars = bars_of(results, reference)
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f_title, f_axis, f_small = _font(18), _font(14), _font(12)
    colours = {k: c for k, _, c in STAGES} | {"total": TOTAL[1], "reference": REFERENCE[1]}
    left, right, top, bottom = 80, w - 230, 50, h - 70
    d.text((left, 14), title or "TTFT breakdown", fill=(0, 0, 0), font=f_title)

    peak = max([sum(s for _, s in b["segments"]) for b in bars] + [b["ttft"] for b in bars] + [1e-9])
    unit, scale = ("ms", 1000.0) if peak < 2.0 else ("s", 1.0)
    step = _nice_step(peak * scale)
    y_max = step * math.ceil(peak * scale * 1.08 / step)

    def y(v):  # value in `unit` → pixel row
        return bottom - (bottom - top) * v / y_max

    # axes, grid, ticks
    v = 0.0
    while v <= y_max + 1e-9:
        d.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        txt = f"{v:g}"
        d.text((left - 8 - d.textlength(txt, font=f_small), y(v) - 7), txt, fill=(60, 60, 60), font=f_small)
        v += step
    d.line([(left, top), (left, bottom)], fill=(0, 0, 0), width=2)
    d.line([(left, bottom), (right, bottom)], fill=(0, 0, 0), width=2)
    ylabel = Image.new("RGBA", (260, 20), (255, 255, 255, 0))
    ImageDraw.Draw(ylabel).text((0, 0), f"time ({unit})", fill=(0, 0, 0), font=f_axis)
    ylabel = ylabel.rotate(90, expand=True)
    img.paste(ylabel, (14, (top + bottom) // 2 - 130), ylabel)
    xlabel = "method and retention ratio"
    d.text(((left + right - d.textlength(xlabel, font=f_axis)) / 2, h - 22), xlabel, fill=(0, 0, 0), font=f_axis)

    # bars
    slot = (right - left) / max(1, len(bars))
    bw = min(90.0, slot * 0.55)
    for i, b in enumerate(bars):
        x0 = left + slot * i + (slot - bw) / 2
        acc = 0.0
        for key, secs in b["segments"]:
            val = secs * scale
            y0, y1 = y(acc + val), y(acc)
            d.rectangle([x0, y0, x0 + bw, y1], fill=colours[key], outline=(255, 255, 255))
            txt = f"{val:.3g}"
            if len(b["segments"]) > 1 and y1 - y0 >= 14 and d.textlength(txt, font=f_small) < bw - 2:
                d.text((x0 + (bw - d.textlength(txt, font=f_small)) / 2, (y0 + y1) / 2 - 7), txt, fill=(0, 0, 0), font=f_small)
            acc += val
        total = f"{acc:.3g} {unit}"
        d.text((x0 + (bw - d.textlength(total, font=f_small)) / 2, y(acc) - 16), total, fill=(0, 0, 0), font=f_small)
        if b["segments"][0][0] in {k for k, _, _ in STAGES}:
            yt = y(b["ttft"] * scale)  # the fused program's TTFT (no host round trips between stages)
            d.line([(x0 + bw + 2, yt), (x0 + bw + 16, yt)], fill=TICK[1], width=3)
        for i, line in enumerate(_wrap(d, b["label"], slot - 6, f_small)):
            d.text((x0 + (bw - d.textlength(line, font=f_small)) / 2, bottom + 6 + 14 * i), line,
                   fill=(0, 0, 0), font=f_small)

    # legend
    lx, ly = right + 20, top
    used = {k for b in bars for k, _ in b["segments"]}
    entries = [(name, c, "box") for k, name, c in STAGES if k in used]
    if "total" in used:
        entries.append((TOTAL[0], TOTAL[1], "box"))
    if "reference" in used:
        entries.append((REFERENCE[0], REFERENCE[1], "box"))
    if used & {k for k, _, _ in STAGES}:
        entries.append((TICK[0], TICK[1], "tick"))
    for name, c, kind in entries:
        if kind == "box":
            d.rectangle([lx, ly + 2, lx + 14, ly + 16], fill=c)
        else:
            d.line([(lx - 2, ly + 9), (lx + 16, ly + 9)], fill=c, width=2)
        d.text((lx + 22, ly + 2), name, fill=(0, 0, 0), font=f_small)
        ly += 24
    return img


def save_chart(path: str, results, reference: dict | None = None, title: str = "", size: tuple[int, int] = SIZE) -> None:
    """Render and write the PNG atomically (temporary file, then rename)."""
    buf = io.BytesIO()
    render(results, reference, title, size).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
