"""Train the toy LLaVA-OneVision on procedural video-QA (data.py), with compression as
augmentation, in JAX with optax.

    python -m earlytom_jax.toy.train --out earlytom_jax/assets/toy --seed 0   # the shipped model

Stages: 3,500 steps, then 2,000-step stages, each with a fresh warm-up and cosine schedule,
until every question type reaches `until` on the validation clips (at least two stages, at
most `max_stages`). The stopping rule is accuracy, not time, because the step at which the
last type (motion) is learned varies between runs: with the clips of data.py both seeds 0
and 1 had every type at 95% or more on validation by the end of stage 1; with an earlier
motion clip seed 1 never learned it (BENCHMARKS.md, docs/toy-train-seeds.json).

Loss: cross-entropy on the answer letter and the `<|im_end|>` after it. Augmentation, drawn per
clip on the host so that every step runs the one compiled program:

- frame merging inside the encoder: runs of alike consecutive frames averaged after a random
  block and only the first frame of each run kept (what EarlyTom's stage I hands the LLM);
  not for scene timing, whose answer (how long the screen stays dark) merging erases;
- frame dropping, rare and light (fewer frames, as frame subsampling gives);
- token subsets: a random share of each frame's pooled tokens kept (stage II, VisionZip,
  uniform pooling, FastV all hand the LLM a subset), sometimes with contextual tokens (a
  kept slot holding a group of dropped ones, as VisionZip's contextual tokens);
- pruning inside the LLM: from a random layer on, only a random share of the visual tokens
  is attended (FastV's layout; positions unchanged).

40% of the clips go through unaugmented. Dropped slots are padding: invalid, no RoPE
position, never attended, exactly how the inference pipeline holds its static buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from earlytom_jax.architectures import random_params
from earlytom_jax.evals.bars import bar, say
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models import qwen2, siglip, stack
from earlytom_jax.prompt import chat_prompt
from earlytom_jax.toy import data
from earlytom_jax.toy.model import IMAGE_SIZE, NUM_FRAMES, TOY_CONFIG, save_checkpoint, tokenizer
from earlytom_jax.video import Preprocessor

SUFFIX_LEN = 48  # question + options + instruction + chat tail, left-padded


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 3500
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    augment: bool = True
    eval_every: int = 500
    eval_per_kind: int = 40
    init: str = ""  # continue from this checkpoint directory, as stage `start_stage`, instead of random weights
    start_stage: int = 1  # the stage index an --init run continues as (its data and record)
    second_stage_steps: int = 2000  # the length of every stage after the first
    until: float = 0.95  # more stages while a type's validation accuracy at a stage's end is below this
    max_stages: int = 4

    def __post_init__(self):
        from earlytom_jax.errors import ConfigError

        # stage i draws clip seeds seed·10^7 + 5·10^6·i + [0, steps·batch), below data.VALIDATION_START
        if not 0 <= self.seed < 80 or not 1 <= self.max_stages <= 4 or max(self.steps, self.second_stage_steps) * self.batch > 5_000_000:
            raise ConfigError(f"toy training needs 0 <= seed < 80, 1 <= max_stages <= 4 and at most 5,000,000 clips "
                              f"per stage (got seed {self.seed}, max_stages {self.max_stages})")


class Encoder:
    """Prompt → (prefix ids, left-padded suffix ids + answer slot) with the toy tokenizer."""

    def __init__(self):
        self.tok = tokenizer()
        text = chat_prompt("{Q}")
        pre, post = text.split("<video>")
        self.prefix = np.asarray(self._ids(pre), np.int32)
        self.post = post
        self.letter_ids = {l: self.tok.token_to_id(l) for l in data.LETTERS}
        self.eos = self.tok.token_to_id("<|im_end|>")

    def _ids(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def suffix(self, prompt: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [SUFFIX_LEN + 1] (left padding, then the prompt tail, then the answer
        letter) and valid bool [SUFFIX_LEN + 1]."""
        ids = self._ids(self.post.replace("{Q}", prompt))
        if len(ids) > SUFFIX_LEN:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds SUFFIX_LEN={SUFFIX_LEN}")
        pad = SUFFIX_LEN - len(ids)
        out = np.zeros(SUFFIX_LEN + 1, np.int32)
        out[pad:SUFFIX_LEN] = ids
        out[SUFFIX_LEN] = self.letter_ids[answer]
        valid = np.zeros(SUFFIX_LEN + 1, bool)
        valid[pad:] = True
        return out, valid


# the shipped preprocessor_config.json; clips are made at the model's size, so no resize
PREPROCESSOR = Preprocessor(size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each frame from the one before it, float [T - 1]."""
    f = frames.astype(np.float32)
    return np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))


def draw_augmentation(rng: np.random.Generator, changes: np.ndarray, s: int, layers: int, llm_layers: int,
                      augment: bool, merge: bool = True) -> dict:
    """One clip's augmentation, as arrays of fixed shape (T frames, s pooled tokens a frame):

    seg_start bool [T], merge_at int: frames whose run starts elsewhere are averaged into the
        run after encoder block `merge_at` (`layers`: no merge) and only run starts are kept;
    frame_keep bool [T]: frames not dropped;
    token_keep bool [T, s]: tokens handed to the LLM;
    token_mix float [T, s, s]: each frame's tokens become token_mix @ tokens (identity, or
        contextual tokens: a kept slot that absorbs a group of dropped ones, as VisionZip's
        contextual tokens and EarlyTom's merges do);
    llm_drop_at int, llm_keep bool [T, s]: from LLM layer `llm_drop_at` on (`llm_layers`:
        never) only `llm_keep` tokens are attended, as FastV prunes inside the LLM.

    Merges join a frame to the run before it only where the two are alike (`changes` below
    SIMILAR), as EarlyTom's stage I does, so flashes and cuts stay their own frames; drops
    are rare and light, so the answer usually survives them (a model trained on inputs whose
    answer is gone learns to guess). For the same reason `merge=False` (question types whose
    answer is a duration, which merging alike frames erases) draws no merges."""
    t = changes.shape[0] + 1
    seg_start = np.ones(t, bool)
    frame_keep = np.ones(t, bool)
    token_keep = np.ones((t, s), bool)
    token_mix = np.broadcast_to(np.eye(s, dtype=np.float32), (t, s, s)).copy()
    llm_keep = np.ones((t, s), bool)
    merge_at, llm_drop_at = layers, llm_layers  # past the last block / layer: none
    if augment and rng.random() > 0.4:
        if rng.random() < 0.6 and merge:
            join = (changes < SIMILAR) & (rng.random(t - 1) < rng.uniform(0.3, 1.0))
            seg_start[1:] = ~join
            run = 0
            for i in range(t):  # runs of at most MAX_RUN frames (EarlyTom's window M)
                run = 1 if seg_start[i] or run == MAX_RUN else run + 1
                seg_start[i] = run == 1
            merge_at = int(rng.integers(0, layers))
        if rng.random() < 0.15:
            frame_keep = rng.random(t) > rng.uniform(0.05, 0.3)
        if rng.random() < 0.5:
            token_keep = rng.random((t, s)) < rng.uniform(0.15, 1.0)
            if rng.random() < 0.4:
                _contextual_tokens(rng, token_keep, token_mix)
        kept = seg_start & frame_keep
        if not kept.any():
            frame_keep[0] = seg_start[0] = True
        for i in np.flatnonzero(seg_start & frame_keep):
            if not token_keep[i].any():
                token_keep[i, rng.integers(s)] = True
        if rng.random() < 0.25:
            llm_drop_at = int(rng.integers(1, llm_layers))
            visible = (seg_start & frame_keep)[:, None] & token_keep
            llm_keep = visible & (rng.random((t, s)) < rng.uniform(0.1, 0.7))
            if not llm_keep.any():
                llm_keep.flat[rng.choice(np.flatnonzero(visible))] = True
    return {"seg_start": seg_start, "merge_at": merge_at, "frame_keep": frame_keep, "token_keep": token_keep,
            "token_mix": token_mix, "llm_drop_at": llm_drop_at, "llm_keep": llm_keep}


def _contextual_tokens(rng, token_keep, token_mix) -> None:
    """In place, per frame: the dropped tokens go to 1 or 2 targets drawn among them, and each
    target (now kept) becomes the mean of its group, or target + mean of the others as the
    official VisionZip computes it (half the clips each)."""
    quirk = rng.random() < 0.5
    for i in range(token_keep.shape[0]):
        dropped = np.flatnonzero(~token_keep[i])
        if dropped.size < 2:
            continue
        targets = rng.choice(dropped, size=min(int(rng.integers(1, 3)), dropped.size - 1), replace=False)
        group = targets[rng.integers(targets.size, size=dropped.size)]
        group[np.searchsorted(dropped, targets)] = targets  # a target belongs to its own group
        for tgt in targets:
            members = dropped[group == tgt]
            others = members[members != tgt]
            row = np.zeros(token_keep.shape[1], np.float32)
            if quirk and others.size:
                row[others] = 1.0 / others.size
                row[tgt] += 1.0
            else:
                row[members] = 1.0 / members.size
            token_mix[i, tgt] = row
            token_keep[i, tgt] = True


DURATION_KINDS = ("scene",)  # the answer is how many frames are dark
SIMILAR = 6.0  # mean |difference| of consecutive uint8 frames below which they may merge
MAX_RUN = 6
AUGMENTATION_KEYS = ("seg_start", "merge_at", "frame_keep", "token_keep", "token_mix", "llm_drop_at", "llm_keep")


def make_batch(samples, enc: Encoder, rng, augment: bool) -> dict:
    cfg = TOY_CONFIG
    out = {k: [] for k in ("pixels", "suffix", "suffix_valid") + AUGMENTATION_KEYS}
    for smp in samples:
        ids, valid = enc.suffix(smp.prompt, smp.answer)
        aug = draw_augmentation(rng, frame_changes(smp.frames), cfg.tokens_per_frame, cfg.vision.num_layers,
                                cfg.text.num_layers, augment, merge=smp.kind not in DURATION_KINDS)
        for k, v in dict(aug, pixels=PREPROCESSOR.normalize(smp.frames), suffix=ids, suffix_valid=valid).items():
            out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}


def _segment_mean(x, seg_start):
    """x [B, T, N, C]; frames replaced by the mean of their run (runs start at seg_start)."""
    seg = jnp.cumsum(seg_start.astype(jnp.int32), axis=1)
    same = (seg[:, :, None] == seg[:, None, :]).astype(x.dtype)
    return jnp.einsum("bts,bsnc->btnc", same / same.sum(-1, keepdims=True), x)


def forward(params, batch, prefix):
    """→ logits [B, 2, V] at the last prompt slot (predicts the letter) and at the letter
    (predicts `<|im_end|>`)."""
    cfg = TOY_CONFIG
    vcfg = cfg.vision
    b, t = batch["pixels"].shape[:2]
    x = siglip.embed(params["vision"], batch["pixels"].reshape((b * t,) + batch["pixels"].shape[2:]), vcfg)
    for layer in range(vcfg.num_layers):
        p = stack.layer(params["vision"]["blocks"], layer)
        x = siglip.block(p, x, vcfg)[0]
        x4 = x.reshape((b, t) + x.shape[1:])
        merged = _segment_mean(x4, batch["seg_start"])
        x = jnp.where((batch["merge_at"] == layer)[:, None, None, None], merged, x4).reshape(x.shape)
    tokens = lov.video_tokens(params, x, cfg)  # [B*T, S, H]
    s, h = tokens.shape[1:]
    tokens = jnp.einsum("btij,btjh->btih", batch["token_mix"], tokens.reshape(b, t, s, h))
    visual = tokens.reshape(b, t * s, h)
    frame_valid = (batch["seg_start"] & batch["frame_keep"])[:, :, None]
    vis_valid = (frame_valid & batch["token_keep"]).reshape(b, t * s)
    vis_late = vis_valid & batch["llm_keep"].reshape(b, t * s)
    embed = params["text"]["embed"]
    seq = jnp.concatenate([
        jnp.broadcast_to(embed[prefix], (b, prefix.shape[0], h)),
        visual,
        jnp.broadcast_to(params["newline"], (b, 1, h)),
        embed[batch["suffix"]],
    ], axis=1)

    def with_visual(v):
        return jnp.concatenate([
            jnp.ones((b, prefix.shape[0]), bool), v, jnp.ones((b, 1), bool), batch["suffix_valid"]
        ], axis=1)

    valid, valid_late = with_visual(vis_valid), with_visual(vis_late)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    # unrolled layers and dense causal attention: XLA:CPU differentiates a scan over layers
    # and the blockwise attention kernel several times slower than this
    cos, sin = qwen2.rope_tables(positions, cfg.text.head_dim, cfg.text.rope_theta)
    for layer in range(cfg.text.num_layers):
        p = stack.layer(params["text"]["layers"], layer)
        key_valid = jnp.where((layer >= batch["llm_drop_at"])[:, None], valid_late, valid)
        seq = qwen2.layer_prefill(p, seq, cos, sin, key_valid, cfg.text, block=seq.shape[1])[0]
    return qwen2.logits(params["text"], seq[:, -2:], cfg.text)


def posemb_sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (big_vision's ViT default), float32
    [grid * grid, width] in the encoder's row-major patch order; values in [-1, 1]."""
    y, x = np.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = y.reshape(-1, 1) * omega[None]
    x = x.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def initial_params(seed: int) -> dict:
    """`random_params`, with the vision tower's (learned) position embedding started from
    `posemb_sincos_2d` instead of N(0, 0.02). Only the motion question needs to know where a
    token sits in its frame. From the tiny random start, motion was the last type learned in
    the shipped run (3,000 steps at chance or near it) and was never learned in a re-run from
    the same seed whose rounding differed (docs/toy-rerun-seed0.json): a start on a plateau.
    With this start seed 0 had motion at 95% by step 3,000 (and kept it under token subsets,
    which the old start's model did not); seed 1 still stayed on the plateau, which the motion
    clip of data.py (one background, the square at the edge for the last third) removed."""
    params = random_params(TOY_CONFIG, seed=seed)
    vcfg = TOY_CONFIG.vision
    params["vision"]["pos"] = jnp.asarray(posemb_sincos_2d(vcfg.grid, vcfg.hidden_size))
    return params


def loss_fn(params, batch, prefix, eos: int):
    logits = forward(params, batch, prefix)
    targets = jnp.stack([batch["suffix"][:, -1], jnp.full_like(batch["suffix"][:, -1], eos)], 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = (jnp.argmax(logits[:, 0], -1) == targets[:, 0]).mean()
    return ce.mean(), acc


def make_optimizer(st: TrainSettings):
    schedule = optax.warmup_cosine_decay_schedule(0.0, st.lr, min(st.warmup, st.steps // 4), st.steps, st.lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=st.weight_decay))


def _batches(st: TrainSettings, stage: int, enc: Encoder, out_q: queue.Queue, stop: threading.Event):
    """Producer thread: batch i holds training seeds first+i*B .. first+i*B+B-1, kinds in turn."""
    rng = np.random.default_rng([st.seed, 1, stage])
    first = st.seed * 10_000_000 + 5_000_000 * stage  # a second stage sees new clips
    for step in range(st.steps):
        if stop.is_set():
            return
        samples = [
            data.make_sample(data.KINDS[(step * st.batch + i) % len(data.KINDS)], first + step * st.batch + i)
            for i in range(st.batch)
        ]
        out_q.put(make_batch(samples, enc, rng, st.augment))


def evaluate(params, enc: Encoder, per_kind: int, predict, split=data.validation) -> dict[str, float]:
    """Accuracy per question type with all tokens (no augmentation) on the first `per_kind`
    clips of `split` (validation by default: training decides on these, never on held-out)."""
    acc = {}
    rng = np.random.default_rng(0)
    for kind in data.KINDS:
        samples = split(kind, per_kind)
        correct = 0
        for i in range(0, per_kind, 20):
            chunk = samples[i:i + 20]
            batch = make_batch(chunk, enc, rng, augment=False)
            letters = np.asarray(predict(params, {k: jnp.asarray(v) for k, v in batch.items()}))
            correct += int((letters == batch["suffix"][:, -1]).sum())
        acc[kind] = correct / per_kind
    return acc


def train(st: TrainSettings, out_dir: str | None = None, log=say, progress: bool = True) -> tuple[dict, dict]:
    """→ (params, record). Stage 0 starts from `initial_params` (or, with `st.init`, stage
    `st.start_stage` from that checkpoint) and runs `st.steps`; stage 1 always follows a stage
    0; later stages (`st.second_stage_steps` each, fresh schedule) follow while some type's
    validation accuracy at the end of the last stage is below `st.until`, up to
    `st.max_stages` stages in all. Saves the checkpoint to `out_dir` at each evaluation from
    stage 1 on and at the end. `log` gets the validation lines; `progress`: a bar over each
    stage's steps (stderr) with the loss and accuracy of the last 50."""
    enc = Encoder()
    init_record = _read_record(st.init) if st.init else None
    params, records, t0 = None, [], time.time()
    stage, steps = (st.start_stage, st.steps) if st.init else (0, st.steps)
    if st.init:
        from earlytom_jax.checkpoint.load import load_any

        params = load_any(st.init)[1]
    else:
        params = initial_params(st.seed)
    while True:
        def on_eval(p, history, seconds, stage=stage, steps=steps):
            if out_dir and stage >= 1:
                record = _record(st, records + [_stage(stage, steps, history, seconds)], time.time() - t0, False, init_record)
                save_checkpoint(p, out_dir, record)

        params, history, seconds = _train_stage(st, params, stage, steps, enc, log, on_eval, progress)
        records.append(_stage(stage, steps, history, seconds))
        learned = min(history[-1]["validation"].values()) >= st.until
        stage, steps = stage + 1, st.second_stage_steps
        if stage >= st.max_stages or steps <= 0 or (stage >= 2 and learned):
            break
        if stage >= 2:
            log(f"after stage {stage}: a type is below {st.until} on validation; stage {stage + 1} follows", flush=True)
    record = _record(st, records, time.time() - t0, True, init_record)
    if out_dir:
        save_checkpoint(params, out_dir, record)
    return params, record


def _train_stage(st, params, stage: int, steps: int, enc, log, on_eval, progress: bool = True):
    """One stage of `steps` optimizer steps from `params`; `on_eval(params, history, seconds)`
    after each validation evaluation. → (params, history, seconds)."""
    prefix = jnp.asarray(enc.prefix)
    st_stage = dataclasses.replace(st, steps=steps)
    opt = make_optimizer(st_stage)
    opt_state = opt.init(params)

    @jax.jit
    def step_fn(params, opt_state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, prefix, enc.eos)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    @jax.jit
    def predict(params, batch):
        return jnp.argmax(forward(params, batch, prefix)[:, 0], -1)

    q: queue.Queue = queue.Queue(maxsize=6)
    stop = threading.Event()
    producer = threading.Thread(target=_batches, args=(st_stage, stage, enc, q, stop), daemon=True)
    producer.start()
    t0 = time.time()
    history = []
    losses, accs = [], []
    steps_bar = bar(steps, f"stage {stage + 1}", "step", progress)
    try:
        for step in range(steps):
            batch = q.get()
            params, opt_state, loss, acc = step_fn(params, opt_state, batch)
            losses.append(loss)
            accs.append(acc)
            steps_bar.update()
            if (step + 1) % 50 == 0:
                steps_bar.set_postfix_str(f"loss {float(np.mean(jax.device_get(losses[-50:]))):.3f}  "
                                          f"acc {float(np.mean(jax.device_get(accs[-50:]))):.2f}", refresh=False)
            if (step + 1) % st.eval_every == 0 or step + 1 == steps:
                l, a = float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(accs)))
                losses, accs = [], []
                held = evaluate(params, enc, st.eval_per_kind, predict)
                elapsed = time.time() - t0
                history.append({"step": step + 1, "minutes": elapsed / 60, "loss": l, "train_acc": a, "validation": held})
                log(f"stage {stage + 1} step {step + 1}/{steps}  {elapsed / 60:.1f} min  loss {l:.3f}  train acc {a:.2f}  "
                    + "  ".join(f"{k} {v:.2f}" for k, v in held.items()), flush=True)
                on_eval(params, history, time.time() - t0)
    finally:
        stop.set()
        steps_bar.close()
    return params, history, time.time() - t0


def _stage(stage: int, steps: int, history, seconds: float) -> dict:
    return {"stage": stage + 1, "steps": steps, "train_seconds": round(seconds, 1), "history": history}


def _record(st: TrainSettings, stages: list, seconds: float, done: bool, init_record=None) -> dict:
    import platform

    return {
        "settings": dataclasses.asdict(st),
        "config": "earlytom_jax.toy.model.TOY_CONFIG",
        "frames": NUM_FRAMES,
        "complete": done,
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})",
        "stages": stages,
        **({"init_record": init_record} if st.init else {}),
    }


def _read_record(directory: str):
    """The training record of the checkpoint a second stage started from (None if it has none)."""
    from earlytom_jax.io_utils import read_json

    path = os.path.join(directory, "training.json")
    return read_json(path) if os.path.exists(path) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory (HF layout)")
    for f in dataclasses.fields(TrainSettings):
        kw = {"action": argparse.BooleanOptionalAction} if f.type in ("bool", bool) else {"type": type(f.default)}
        ap.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    from earlytom_jax.errors import ConfigError

    try:
        st = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
    except ConfigError as e:
        ap.error(str(e))
    train(st, args.out, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
