"""`--model ORG/NAME`: a Hugging Face hub id → the local snapshot directory every loader reads.

`resolve_model` is called once where a model is named (`VideoLLM.load`, `load_any`, the
commands' --model and `convert`'s source); downstream sees a directory only. A local path
always wins over a hub id of the same spelling. The cache is huggingface_hub's own
(HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN as it reads them): a complete cached
snapshot is used without touching the network; otherwise, online, only the files the loaders
read are fetched (`PATTERNS`: configs, tokenizer.json and the like, *.safetensors; never pickled
*.bin/*.pt weights, never remote code); offline and not cached, one CheckpointError line says
how to fetch it.
"""

from __future__ import annotations

import os
import re

from earlytom_jax.errors import CheckpointError, one_line

# Every file a loader here reads: config.json, tokenizer.json, tokenizer_config.json,
# (video_)preprocessor_config.json, model.safetensors.index.json and the weights.
PATTERNS = ("*.json", "*.safetensors")

# ORG/NAME as the hub spells it (huggingface_hub validates the rest)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(spec: str) -> bool:
    """True when `spec` is spelt like a hub model id (ORG/NAME), whether or not it exists."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec and "--" not in spec and not spec.endswith(".")


def _has_weights(directory: str) -> bool:
    """A snapshot holding config.json and its weights (every shard the index names)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return False
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        from earlytom_jax.io_utils import read_json

        try:
            shards = set(read_json(index).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        return bool(shards) and all(os.path.isfile(os.path.join(directory, s)) for s in shards)
    return any(name.endswith(".safetensors") for name in os.listdir(directory))


def resolve_model(spec, cache_dir: str | None = None) -> str:
    """`spec` (a directory, or a hub id such as `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`) →
    a local directory. Anything that exists on disk, or is not spelt ORG/NAME, comes back as
    it is (the loaders then say what is missing). `cache_dir`: huggingface_hub's cache_dir
    argument (default: its own, from HF_HUB_CACHE / HF_HOME). CheckpointError (one line) when
    the id is neither cached nor downloadable."""
    spec = os.fspath(spec)
    if os.path.exists(spec) or not is_hub_id(spec):
        return spec
    import huggingface_hub
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    kw = dict(allow_patterns=list(PATTERNS), cache_dir=cache_dir)
    try:
        cached = snapshot_download(spec, local_files_only=True, **kw)
    except LocalEntryNotFoundError:  # not cached, or a cached listing says files are missing
        cached = None
    except HFValidationError:
        return spec
    if cached is not None and _has_weights(cached):
        return cached
    try:
        return snapshot_download(spec, **kw)  # offline, a partial snapshot comes back as it is
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if huggingface_hub.is_offline_mode() else "the hub could not be reached"
        raise CheckpointError(
            f"{spec}: no such directory, and this hub model is not in the Hugging Face cache ({where}) while {why}; "
            f"fetch it with `hf download {spec} --include '*.json' '*.safetensors'`, or run once online"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{spec}: no such directory, and no model {spec} on the Hugging Face hub (gated or private models "
            "need `hf auth login` first)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{spec}: downloading from the Hugging Face hub failed ({one_line(e, 200)})") from None
