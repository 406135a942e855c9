"""A picture of what a method kept: one tile per frame that reached the LLM, in order.

Each tile shows the input frame that weighs most in the (merged) frame, with the pooled-token
grid drawn over it: kept tokens bright with a yellow outline, the rest dimmed. For EarlyTom
the caption says which sampled frames the merged frame absorbed and whether it was dynamic
(D: top-k tokens) or static (S: one token per run), and a coloured bar marks the final
segments. Methods without frame merging show their frames one to one (uniform frames: the
frames it kept), and every token entering the LLM when they select none (full tokens; FastV,
which drops tokens only inside the LLM). Qwen2.5-VL's encoder sees pairs of frames (temporal
patches) and keeps a rows x columns grid of merged tokens for each: one tile per pair.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from earlytom_jax.io_utils import atomic_write_bytes

_SEGMENT_COLOURS = [(230, 80, 80), (80, 160, 240), (90, 200, 120), (240, 180, 60), (180, 110, 230), (60, 200, 200)]


def render(frames: np.ndarray, stats: dict, grid, label: str = "EarlyTom", picked=None, group: int = 1,
           tile: int = 168, columns: int = 8):
    """frames uint8 [T0, H, W, 3] (the sampled frames); stats: the pipeline's statistics as
    Python values (any method whose tokens are grid tokens: all but ToMe); grid: the token grid
    of one encoded frame, a side (LLaVA's pooled grid) or (rows, columns); label: the method's
    name for the title; picked: the sampled frames a frame-dropping method encoded
    (`method.input_frames`); group: sampled frames per encoded frame (Qwen2.5-VL's 2).
    → (PIL image, number of highlighted tokens)."""
    n = int(stats["frames"])
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    merging = "frame_mixing" in stats
    if merging:  # over encoded frames; a temporal patch's weight shared by its `group` frames
        mixing = np.asarray(stats["frame_mixing"], np.float32)[:n]
        mixing = (np.repeat(mixing, group, axis=1) / group)[:, : len(frames)]
    else:
        sources = list(picked) if picked is not None else list(range(len(frames)))
        mixing = np.zeros((n, len(frames)), np.float32)
        for r in range(n):
            mixing[r, [sources[min(r * group + k, len(sources) - 1)] for k in range(group)]] = 1.0
    starts = list(stats["segment_starts"])[:n] if merging else None
    dynamic = list(stats["dynamic"])[:n] if merging else None
    per_frame = gh * gw
    kept = [set() for _ in range(n)]
    if "kept_index" in stats:
        for idx in stats["kept_index"]:
            if idx >= 0:
                kept[idx // per_frame].add(idx % per_frame)
    else:  # every token of every frame enters the LLM
        kept = [set(range(per_frame)) for _ in range(n)]
    rows = -(-n // columns)
    cap_h = 34
    img = Image.new("RGB", (columns * tile, rows * (tile + cap_h) + 24), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    total = int(sum(len(k) for k in kept))
    how = "after merging" if merging else "encoded"
    legend = "; D = dynamic (top-k), S = static (one per run)" if merging else ""
    draw.text((6, 5), f"{label}: {len(frames)} sampled frames -> {n} {how}; {total} tokens enter the LLM "
                      f"(bright){legend}", fill=(235, 235, 235))
    segment = -1
    highlighted = 0
    cell_h, cell_w = tile / gh, tile / gw
    for r in range(n):
        if starts is None or starts[r]:
            segment += 1
        x0, y0 = (r % columns) * tile, 24 + (r // columns) * (tile + cap_h)
        sources = [int(t) for t in np.nonzero(mixing[r] > 0)[0]]
        main = int(np.argmax(mixing[r]))
        thumb = Image.fromarray(frames[main]).resize((tile, tile), Image.BILINEAR)
        arr = np.asarray(thumb).astype(np.float32)
        mask = np.zeros((tile, tile), bool)
        for k in kept[r]:
            i, j = divmod(k, gw)
            mask[int(i * cell_h) : int((i + 1) * cell_h), int(j * cell_w) : int((j + 1) * cell_w)] = True
        arr = np.where(mask[..., None], arr, arr * 0.3)
        img.paste(Image.fromarray(arr.astype(np.uint8)), (x0, y0))
        for k in sorted(kept[r]):
            i, j = divmod(k, gw)
            draw.rectangle([x0 + j * cell_w, y0 + i * cell_h, x0 + (j + 1) * cell_w - 1, y0 + (i + 1) * cell_h - 1],
                           outline=(255, 220, 0))
            highlighted += 1
        src = ",".join(map(str, sources)) if len(sources) <= 4 else f"{sources[0]}..{sources[-1]} ({len(sources)})"
        if merging:
            colour = _SEGMENT_COLOURS[segment % len(_SEGMENT_COLOURS)]
            draw.rectangle([x0, y0 + tile, x0 + tile - 1, y0 + tile + 4], fill=colour)
            draw.text((x0 + 4, y0 + tile + 7), f"#{r} {'D' if dynamic[r] else 'S'} <- {src}", fill=(235, 235, 235))
            draw.text((x0 + 4, y0 + tile + 20), f"{len(kept[r])} tokens, seg {segment}", fill=(170, 170, 170))
        else:
            draw.text((x0 + 4, y0 + tile + 7), f"#{r} <- frame{'s' if len(sources) > 1 else ''} {src}",
                      fill=(235, 235, 235))
            draw.text((x0 + 4, y0 + tile + 20), f"{len(kept[r])} tokens", fill=(170, 170, 170))
    return img, highlighted


def save_png(img: Image.Image, path: str) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
