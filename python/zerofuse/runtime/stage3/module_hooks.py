"""ZeRO-3's hooks on the model's modules: fetch a module's units before its
forward, let them go after, and put a node on its outputs that fetches them
again before its backward.

Hooks go on every module that holds units (and on the model itself, whose
forward delimits an iteration). A module that reads another's parameter
directly gains that unit on first access (PartitionedParameters.on_access),
so its hooks are installed on all modules, cheap where there is nothing to do.
"""
import weakref

import torch


class _BeforeBackward(torch.autograd.Function):
    """Identity on a module's output tensors; its backward -- run when the
    gradient reaches those outputs, before the module's own backward --
    fetches the module's units."""

    @staticmethod
    def forward(ctx, store_ref, module, *tensors):
        ctx.store_ref, ctx.module = store_ref, module
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        store = ctx.store_ref()
        if store is not None:
            store.before_module_backward(ctx.module)
        return (None, None, *grads)


def _collect(obj, out):
    """Tensors of a module's output that backward will reach, with where they sit."""
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad and obj.is_floating_point() and all(t is not obj for t in out):
            out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, out)


def _replace(obj, mapping):
    """obj with every tensor in `mapping` (by id) replaced; containers rebuilt
    (tuples, named tuples, lists) or updated in place (dicts, Hugging Face's
    ModelOutput, which keeps its attributes in step with its items)."""
    if isinstance(obj, torch.Tensor):
        return mapping.get(id(obj), obj)
    if isinstance(obj, tuple):
        items = [_replace(x, mapping) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return type(obj)(_replace(x, mapping) for x in obj)
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            new = _replace(obj[k], mapping)
            if new is not obj[k]:
                obj[k] = new
        return obj
    return obj


class ModuleHooks:
    def __init__(self, model: torch.nn.Module, store):
        store_ref = weakref.ref(store)  # the model must not keep the engine alive
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(store_ref, module is model)))
            self.handles.append(module.register_forward_hook(self._post(store_ref, module is model),
                                                             always_call=True))

    @staticmethod
    def _pre(store_ref, is_model):
        def hook(module, args):
            store = store_ref()
            if store is None:
                return None
            if is_model and not store.module_stack:
                store.begin_iteration()
            store.module_starts(module)
            return None

        return hook

    @staticmethod
    def _post(store_ref, is_model):
        def hook(module, args, output):
            store = store_ref()
            if store is None or not store.module_stack or store.module_stack[-1][0] is not module:
                return None  # an exception unwound past the pre-hook's bookkeeping
            needs_backward_fetch = store.module_ends(module)
            if needs_backward_fetch and torch.is_grad_enabled():
                tensors = []
                _collect(output, tensors)
                if tensors:
                    wrapped = _BeforeBackward.apply(store_ref, module, *tensors)
                    output = _replace(output, {id(t): w for t, w in zip(tensors, wrapped)})
                else:
                    store.hold_for_backward(module)
            if is_model and not store.module_stack and not torch.is_grad_enabled():
                store.end_iteration()  # evaluation or generation: no backward follows
            return output

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
