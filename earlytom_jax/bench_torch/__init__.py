"""The PyTorch original on the same footing (`earlytom bench --reference torch`): transformers'
full-token `LlavaOnevisionForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`
(LLaVA-Video: LLaVA-NeXT's `llava_vid` path on transformers' LLaVA-OneVision modules,
`llava_video_torch`),
on CPU with the same weights, pixels, prompt ids and dtype as the JAX run, timed with the
paper's protocol (warm-ups, then mean and median of timed calls producing one token, under
`torch.no_grad`: `generate` calls for LLaVA-OneVision, prefill forwards for Qwen2.5-VL, whose
3-D positions are handed over explicitly); on a GPU (benchmarks/gpu_check.py) built there with
its own random weights, timing prefill forwards.

Same weights: for a named architecture the random transformers model is built first (from a
config written from ours) and our parameter tree is read from its state dict in memory with
the checkpoint loader's own mapping (`checkpoint.hf.iter_params`); for a checkpoint directory
both sides load the same files. torch and transformers are imported only here, lazily.

models.py builds or loads the transformers model, weights.py moves its weights into our tree,
timing.py times it.
"""

from earlytom_jax.bench_torch.models import (HF_CLASSES, HF_CONFIGS, build_random, hf_class_name, hf_config_dict,
                                             load_pretrained, qwen_config_dict, require)
from earlytom_jax.bench_torch.timing import measure, qwen_positions
from earlytom_jax.bench_torch.weights import params_from_torch

__all__ = ["HF_CLASSES", "HF_CONFIGS", "build_random", "hf_class_name", "hf_config_dict", "load_pretrained",
           "measure", "params_from_torch", "qwen_config_dict", "qwen_positions", "require"]
