"""Train the toy LLaVA-OneVision on procedural video-QA (data.py), with compression as
augmentation (batch.py), in JAX with optax.

    python -m earlytom_jax.toy.train --out earlytom_jax/assets/toy --seed 0   # the shipped model

Stages: 3,500 steps, then 2,000-step stages, each with a fresh warm-up and cosine schedule,
until every question type reaches `until` on the validation clips (at least two stages, at
most `max_stages`). The stopping rule is accuracy, not time, because the step at which the
last type (motion) is learned varies between runs: with the clips of data.py both seeds 0
and 1 had every type at 95% or more on validation by the end of stage 1; with an earlier
motion clip seed 1 never learned it (BENCHMARKS.md, docs/toy-train-seeds.json).

The loss and forward pass are in loss.py, the batches and their augmentation in batch.py,
the training record (training.json) in record.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from earlytom_jax.progress import bar, say
from earlytom_jax.toy import data
from earlytom_jax.toy.batch import Encoder, make_batch
from earlytom_jax.toy.loss import forward, initial_params, loss_fn
from earlytom_jax.toy.model import save_checkpoint
from earlytom_jax.toy.record import read_record, stage_record, training_record


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
    init_record = read_record(st.init) if st.init else None
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
                record = training_record(st, records + [stage_record(stage, steps, history, seconds)], time.time() - t0, False, init_record)
                save_checkpoint(p, out_dir, record)

        params, history, seconds = _train_stage(st, params, stage, steps, enc, log, on_eval, progress)
        records.append(stage_record(stage, steps, history, seconds))
        learned = min(history[-1]["validation"].values()) >= st.until
        stage, steps = stage + 1, st.second_stage_steps
        if stage >= st.max_stages or steps <= 0 or (stage >= 2 and learned):
            break
        if stage >= 2:
            log(f"after stage {stage}: a type is below {st.until} on validation; stage {stage + 1} follows", flush=True)
    record = training_record(st, records, time.time() - t0, True, init_record)
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
