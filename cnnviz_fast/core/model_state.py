"""Leave a user's model exactly as it was, whatever happens inside a method."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

# Every per-module hook registry; anything a method adds is removed on exit.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run a method on ``model`` and restore it afterwards, also after an exception.

    Restored: each module's train/eval flag, each parameter's ``requires_grad``,
    each module's children (a swapped module is put back) and hook registries
    (hooks added inside the block are removed). With ``eval_mode=True`` (what every
    method of this package does) the model runs in eval mode for the duration of the
    call, so dropout is off and batch-norm running statistics are never updated;
    a model that was in training mode is put back in training mode afterwards.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.modules())
    training = [m.training for m in modules]
    children = [dict(m._modules) for m in modules]
    hooks = [{name: set(getattr(m, name, {}) or {}) for name in _HOOK_DICTS} for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for m, flag, kids, hook_keys in zip(modules, training, children, hooks):
            m.training = flag
            if m._modules != kids:
                m._modules.clear()
                m._modules.update(kids)
            for name, keys in hook_keys.items():
                registry = getattr(m, name, None)
                if registry:
                    for key in [k for k in registry if k not in keys]:
                        del registry[key]
        for p, flag in zip(params, requires_grad):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
