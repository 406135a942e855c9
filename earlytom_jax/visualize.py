"""A picture of what EarlyTom kept: one tile per frame that reached the LLM, in order.

Each tile shows the input frame that weighs most in the merged frame, with the pooled-token
grid drawn over it: kept tokens bright with a yellow outline, the rest dimmed. The caption
says which sampled frames the merged frame absorbed and whether it was dynamic (D: top-k
tokens) or static (S: one token per run); a coloured bar marks the final segments.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from earlytom_jax.io_utils import atomic_write_bytes

_SEGMENT_COLOURS = [(230, 80, 80), (80, 160, 240), (90, 200, 120), (240, 180, 60), (180, 110, 230), (60, 200, 200)]


def render(frames: np.ndarray, stats: dict, pooled_grid: int, tile: int = 168, columns: int = 8):
    """frames uint8 [T0, H, W, 3] (the sampled frames); stats: the pipeline's statistics as
    Python values (EarlyTom). → (PIL image, number of highlighted tokens)."""
    n = int(stats["frames"])
    mixing = np.asarray(stats["frame_mixing"], np.float32)[:n, : len(frames)]
    starts = list(stats["segment_starts"])[:n]
    dynamic = list(stats["dynamic"])[:n]
    per_frame = pooled_grid * pooled_grid
    kept = [set() for _ in range(n)]
    for idx in stats["kept_index"]:
        if idx >= 0:
            kept[idx // per_frame].add(idx % per_frame)
    rows = -(-n // columns)
    cap_h = 34
    img = Image.new("RGB", (columns * tile, rows * (tile + cap_h) + 24), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    total = int(sum(len(k) for k in kept))
    draw.text((6, 5), f"{len(frames)} sampled frames -> {n} after merging; {total} tokens kept "
                      f"(bright); D = dynamic (top-k), S = static (one per run)", fill=(235, 235, 235))
    segment = -1
    highlighted = 0
    cell = tile / pooled_grid
    for r in range(n):
        if starts[r]:
            segment += 1
        x0, y0 = (r % columns) * tile, 24 + (r // columns) * (tile + cap_h)
        sources = [int(t) for t in np.nonzero(mixing[r] > 0)[0]]
        main = int(np.argmax(mixing[r]))
        thumb = Image.fromarray(frames[main]).resize((tile, tile), Image.BILINEAR)
        arr = np.asarray(thumb).astype(np.float32)
        mask = np.zeros((tile, tile), bool)
        for k in kept[r]:
            i, j = divmod(k, pooled_grid)
            mask[int(i * cell) : int((i + 1) * cell), int(j * cell) : int((j + 1) * cell)] = True
        arr = np.where(mask[..., None], arr, arr * 0.3)
        img.paste(Image.fromarray(arr.astype(np.uint8)), (x0, y0))
        for k in sorted(kept[r]):
            i, j = divmod(k, pooled_grid)
            draw.rectangle([x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1],
                           outline=(255, 220, 0))
            highlighted += 1
        colour = _SEGMENT_COLOURS[segment % len(_SEGMENT_COLOURS)]
        draw.rectangle([x0, y0 + tile, x0 + tile - 1, y0 + tile + 4], fill=colour)
        src = ",".join(map(str, sources)) if len(sources) <= 4 else f"{sources[0]}..{sources[-1]} ({len(sources)})"
        draw.text((x0 + 4, y0 + tile + 7), f"#{r} {'D' if dynamic[r] else 'S'} <- {src}", fill=(235, 235, 235))
        draw.text((x0 + 4, y0 + tile + 20), f"{len(kept[r])} tokens, seg {segment}", fill=(170, 170, 170))
    return img, highlighted


def save_png(img: Image.Image, path: str) -> None:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
