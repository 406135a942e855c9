"""Our parameter tree read from a transformers model in memory, with the checkpoint loader's
own name mapping (`checkpoint.hf.iter_params`), the model's tensors given back as they move."""

from __future__ import annotations

from earlytom_jax.config import ModelConfig

class _StateDict:
    """The loader's file interface (`shape`, `get`) over a torch model's state dict. `get`
    gives a view of the tensor's storage (bf16 as JAX's numpy bfloat16: no fp32 copy), valid
    until the next `get` (the loader copies each into our dtype at once). With `release`, a
    tensor's storage is given back once every name sharing it has been read (tied weights share
    one), at the next `get` or `release_rest`, so the model shrinks while our tree grows."""

    def __init__(self, model, release: bool = False):
        self._model, self._sd, self._release = model, model.state_dict(), release
        self._unread: dict[int, int] = {}
        self._read: list[int] = []  # storages wholly read, given back at the next `get`
        for t in self._sd.values():
            self._unread[t.data_ptr()] = self._unread.get(t.data_ptr(), 0) + 1

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def get(self, name):
        import jax.numpy as jnp
        import torch

        self._give_back(self._read)
        t = self._sd[name].detach()
        out = t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        ptr = t.data_ptr()
        self._unread[ptr] -= 1
        if self._release and self._unread[ptr] == 0:
            self._read = [ptr]
        return out

    def release_rest(self) -> None:
        """Give back every storage still held (what our tree does not read, and the last read)."""
        self._give_back({t.data_ptr() for t in self._sd.values()})

    def _give_back(self, ptrs) -> None:
        for n, v in list(self._sd.items()):
            if v.data_ptr() in ptrs:
                _empty(self._model, n)
                del self._sd[n]
        self._read = []


def _empty(model, name: str) -> None:
    """Replace parameter or buffer `name` of `model` by an empty tensor (frees its storage)."""
    import torch

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = getattr(module, leaf)
    current.data = torch.empty(0, dtype=current.dtype)


def params_from_torch(model, cfg: ModelConfig, dtype: str = "float32", shardings=None, release: bool = False,
                      held: bool = False) -> dict:
    """Our parameter tree with the weights of a transformers model (in memory, one tensor at a
    time, with the checkpoint loader's name mapping and checks); `shardings` as `load_hf`'s.
    `release` empties the model's tensors as they are read (peak: one model plus one stacked
    leaf instead of two models); the model cannot run afterwards. `held`: bf16 LLM stacks on
    one CPU device come already split per layer (`stack.split_layers`), so that `stack.pack`
    needs no stacked leaf's transient on top (the 7B shape: 3.8 GB)."""
    import jax
    import jax.numpy as jnp

    from earlytom_jax.checkpoint import table
    from earlytom_jax.checkpoint.hf import iter_params
    from earlytom_jax.checkpoint.placement import resolve_dtype, sharding_lookup
    from earlytom_jax.models import stack
    from earlytom_jax.models.params import set_path

    sd = _StateDict(model, release)
    files = {name: sd for name in sd.names()}
    lookup = sharding_lookup(shardings, table.shapes(cfg)) if shardings is not None else None
    params: dict = {}
    split = held and lookup is None and jax.default_backend() == "cpu"
    for path, arr in iter_params(files, cfg, resolve_dtype(dtype)):
        if split and path[:2] == ("text", "layers") and arr.dtype == jnp.bfloat16:
            leaf = stack.split_layers(path[-1], arr)
        else:
            leaf = jax.device_put(arr) if lookup is None else jax.device_put(arr, lookup(path))
        set_path(params, path, leaf)
        del arr  # before the next stack is read: one host copy of a stacked leaf at a time
        if release:
            _trim()
    if release:  # what our tree does not read (a tied head, SigLIP's unused post-norm) goes too
        sd.release_rest()
        _return_freed_memory()
    return params


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps the tensors' freed blocks
    below its mmap threshold; at the 7B shape that is gigabytes the JAX run then lacks)."""
    import gc

    gc.collect()
    _trim()


def _trim() -> None:
    """glibc's malloc_trim: free heap pages back to the OS (also between leaves while weights
    move, where the released tensors' pages would otherwise pile up under the growing tree)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
