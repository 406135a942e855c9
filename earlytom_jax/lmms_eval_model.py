"""lmms-eval model `earlytom_jax`: any lmms-eval video task with our models and methods.

    pip install -e '.[lmms]'
    python -m lmms_eval --model earlytom_jax \\
        --model_args pretrained=DIR,method=earlytom,ratio=0.1,batch_size=4 \\
        --tasks videomme --log_samples --output_path results/

lmms-eval 0.7.x finds the model through the entry-point group `lmms_eval.models`
(pyproject.toml), which names `manifest` below: 0.7.3 loads a `ModelManifest` (or a callable
returning one) from that group, not a model class.

model_args (lmms-eval's `key=value,...`):
    pretrained        checkpoint directory or hub id (`VideoLLM.load`); required
    method            a compression registry name (full, earlytom, fastv, visionzip, ...), default "full"
    ratio, preset     the method's budget and --preset TASK@R, as `VideoLLM.method`
    frames            frames sampled per video (lmms-eval's max_frames_num), default 32;
                      max_frames_num is accepted as another name for it
    max_new_tokens    cap on the task's own limit (default: the task's limit, uncapped)
    dtype, mesh       as `earlytom eval --dtype/--mesh`; lmms-eval splits model_args at commas,
                      so write the mesh with ";" (mesh=data=2;model=4)
    batch_size        videos per jitted prefill + decode (`VideoLLM.ask_batch`); model_args'
                      value wins over lmms-eval's --batch_size
    min_pixels, max_pixels   Qwen2.5-VL's frame area bounds (default: `earlytom eval`'s)
    time_instruction  LLaVA-Video: lmms-eval llava_vid's add_time_instruction (default False)

Requests: the context is lmms-eval's prompt text; doc_to_visual must give one video file per
request (what every lmms-eval video task gives); the model's family samples its frames and
wraps the text in its chat template exactly as `earlytom eval` does, so an answer here equals
`earlytom eval`'s on the same video, prompt, frames and method. Decoding is greedy whatever
gen_kwargs say (temperature, do_sample are ignored; a warning says so once). The answer is cut
at the first of gen_kwargs' `until` strings, except lmms-eval's default "\\n\\n" (its
fewshot delimiter, added to tasks that set none; its qwen2_5_vl model drops it as well).
An unreadable video answers "" (logged), as lmms-eval's llava_onevision carries on.
One process: rank 0 of world size 1 (use `mesh` for several devices, not `accelerate launch`).
Generation only: `loglikelihood` tasks are refused.
"""

from __future__ import annotations

import logging

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from earlytom_jax.errors import ConfigError
from earlytom_jax.video import VideoError

log = logging.getLogger(__name__)

MODEL_ID = "earlytom_jax"
DEFAULT_UNTIL = "\n\n"  # lmms-eval's fewshot delimiter: the `until` of tasks that set none


def manifest():
    """What the `lmms_eval.models` entry point gives lmms-eval: our one simple model (a
    `ModelManifest`, imported here: importing lmms_eval.models at module level would load the
    entry points while this module is half imported)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.EarlyTomJax")


def cut_at(text: str, until) -> str:
    """`text` up to the first occurrence of any `until` string (lmms-eval's default
    "\\n\\n" excepted)."""
    if isinstance(until, str):
        until = [until]
    for stop in until or []:
        if stop and stop != DEFAULT_UNTIL:
            text = text.split(stop)[0]
    return text


class EarlyTomJax(lmms):
    """lmms-eval's simple-model interface over `earlytom_jax.api.VideoLLM` (see module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "full",
        ratio: float | None = None,
        preset: str | None = None,
        frames: int | None = None,
        max_frames_num: int | None = None,
        max_new_tokens: int | None = None,
        dtype: str = "float32",
        mesh: str | None = None,
        batch_size: int | str = 1,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        time_instruction: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes these to every model; unused here
        device: str | None = None,
    ) -> None:
        super().__init__()
        from earlytom_jax.api import VideoLLM
        from earlytom_jax.video_qwen import QwenVideoSettings

        if not pretrained:
            raise ConfigError("earlytom_jax needs model_args pretrained=DIR (a checkpoint directory or hub id)")
        if frames is not None and max_frames_num is not None and int(frames) != int(max_frames_num):
            raise ConfigError(f"frames={frames} and max_frames_num={max_frames_num} disagree; give one")
        self.frames = int(frames if frames is not None else max_frames_num if max_frames_num is not None else 32)
        self._batch_size = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = None if max_new_tokens is None else _positive_int(max_new_tokens, "max_new_tokens")
        if device not in (None, "", "cpu", "cuda", "gpu", "tpu"):
            log.warning("earlytom_jax: device=%s ignored; JAX places the model (use mesh= for several devices)", device)
        video = QwenVideoSettings(frames=self.frames)
        if min_pixels is not None or max_pixels is not None:
            video = QwenVideoSettings(frames=self.frames, min_pixels=int(min_pixels or video.min_pixels),
                                      max_pixels=int(max_pixels or video.max_pixels))
        mesh = str(mesh).strip("'\"").replace(";", ",") if mesh else None
        self.llm = VideoLLM.load(str(pretrained), str(dtype), mesh, video=video,
                                 time_instruction=bool(time_instruction))
        self.method = self.llm.method(str(method), ratio=None if ratio is None else float(ratio),
                                      preset=None if preset is None else str(preset))
        if hasattr(self.method, "check"):
            self.method = self.method.check(self.llm.cfg)
        self._warned_sampling = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval always passes its --batch_size (default 1) besides model_args; a
        batch_size given in model_args wins, so both spellings work."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # ------------------------------------------------------------------------------- requests

    def _video(self, visuals, task: str) -> str:
        if isinstance(visuals, (list, tuple)) and len(visuals) == 1 and isinstance(visuals[0], str):
            return visuals[0]
        kinds = sorted({type(v).__name__ for v in visuals}) if isinstance(visuals, (list, tuple)) else [type(visuals).__name__]
        raise ConfigError(f"earlytom_jax answers about one video file per request; task {task} gave "
                          f"{len(visuals) if isinstance(visuals, (list, tuple)) else 1} visual(s) of type {', '.join(kinds) or 'none'}")

    def _limit(self, gen_kwargs: dict) -> int:
        n = int(gen_kwargs.get("max_new_tokens", 128))
        if self.max_new_tokens is not None:
            n = min(n, self.max_new_tokens)
        if (gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0) and not self._warned_sampling:
            log.warning("earlytom_jax decodes greedily; the task's sampling settings are ignored")
            self._warned_sampling = True
        return n

    def _answer(self, videos: list[str], questions: list[str], limit: int) -> list[str]:
        """One chunk through `ask_batch`; if a video cannot be read, the chunk one by one, and
        "" for each unreadable video."""
        def ask(vs, qs):
            return [a.text for a in self.llm.ask_batch(vs, qs, self.method, self.frames, limit,
                                                       batch_size=self.batch_size)]

        try:
            return ask(videos, questions)
        except VideoError:
            pass
        out = []
        for v, q in zip(videos, questions):
            try:
                out += ask([v], [q])
            except VideoError as e:
                log.error("earlytom_jax: %s; answering ''", e)
                out.append("")
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in the requests' order; requests with the same token limit are batched
        (`batch_size` at a time) in their given order."""
        res: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            video = self._video(doc_to_visual(self.task_dict[task][split][doc_id]), task)
            limit = self._limit(gen_kwargs)
            until = gen_kwargs.get("until")
            prepared.append((context, gen_kwargs, video, until))
            groups.setdefault(limit, []).append(i)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for limit, idx in groups.items():
            for j in range(0, len(idx), self.batch_size):
                part = idx[j : j + self.batch_size]
                texts = self._answer([prepared[i][2] for i in part], [prepared[i][0] for i in part], limit)
                for i, text in zip(part, texts):
                    context, gen_kwargs, _, until = prepared[i]
                    text = cut_at(text, until)
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(len(part))
        pbar.close()
        return res

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("earlytom_jax generates answers only; loglikelihood (multiple-choice by "
                                  "likelihood) tasks are not supported: use the task's generate_until variant")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("earlytom_jax answers single-round requests only (generate_until)")


def _positive_int(value, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"earlytom_jax: {name}={value!r} should be a positive integer (no 'auto')") from None
    if n < 1:
        raise ConfigError(f"earlytom_jax: {name}={value} should be at least 1")
    return n
