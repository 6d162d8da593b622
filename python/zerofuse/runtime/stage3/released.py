"""A partitioned (ZeRO-3) parameter while its values are not on this rank.

Such a parameter keeps its identity (autograd, optimizers, user code hold it)
but its .data is an empty tensor of its dtype and device, and it carries
DeepSpeed's attributes: ds_numel, ds_shape, ds_status (ZeroParamStatus), ds_id.

Its class is switched, for as long as it is released, to a subclass of its own
class whose __torch_function__ asks the parameter's owner what to do with an
operation that reads it: the owner gathers it (inside a module's forward, a
zero.Init construction or a GatheredParameters block) or lets the operation
see the empty tensor, as DeepSpeed's partitioned parameters do. Metadata reads
(shape, dtype, hashing, hooks) never gather. Gathered parameters have their
own class back, so they cost nothing extra in the operations that use them.
"""
import enum
import weakref

import torch


class ZeroParamStatus(enum.Enum):
    """DeepSpeed's names: AVAILABLE (values present), NOT_AVAILABLE
    (partitioned), INFLIGHT (a gather is under way)."""

    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


# Reading these never needs the values.
_METADATA = {"__get__", "__set__", "__delete__", "__hash__", "__reduce_ex__", "size", "dim", "numel",
             "data_ptr", "element_size", "is_floating_point", "is_complex", "requires_grad_", "register_hook",
             "register_post_accumulate_grad_hook", "stride", "storage_offset", "untyped_storage", "is_contiguous",
             "__len__", "type", "get_device", "nelement", "ndimension", "is_signed", "__format__", "__repr__",
             "__deepcopy__", "share_memory_", "is_shared", "is_pinned", "_is_view"}

_released_classes = {}


def _released_class(cls):
    """The stand-in class for a released parameter of class `cls` (made once per class)."""
    if cls not in _released_classes:
        _released_classes[cls] = type(f"Released{cls.__name__}", (cls,), {
            "__torch_function__": classmethod(_torch_function),
            "_zf_original_class": cls,
        })
    return _released_classes[cls]


def _released_in(args, kwargs):
    found = []

    def visit(x):
        if isinstance(x, torch.Tensor) and getattr(type(x), "_zf_original_class", None) is not None:
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    visit(args)
    if kwargs:
        visit(list(kwargs.values()))
    return found


def _torch_function(cls, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    if getattr(func, "__name__", None) not in _METADATA:
        afterwards = []
        for param in _released_in(args, kwargs):
            owner = owner_of(param)
            done = owner.on_access(param) if owner is not None else None
            if done is not None:
                afterwards.append(done)
        if afterwards:  # the classes have changed: dispatch again from the start
            try:
                return func(*args, **kwargs)
            finally:
                for done in afterwards:
                    done()
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def owner_of(param):
    """What partitioned `param` (a zero.Init context, an engine), or None."""
    ref = getattr(param, "_zf_owner", None)
    return ref() if ref is not None else None


def is_released(param) -> bool:
    return getattr(type(param), "_zf_original_class", None) is not None


def attach(param, owner, ds_id: int, shape: torch.Size, strong: bool = False):
    """Make `param` a partitioned parameter of `owner`. The owner's
    on_access(param) decides about an operation reading the released
    parameter: None lets it see the empty tensor; otherwise the owner has
    gathered it and returns what to call once the operation is done. An
    engine is referred to weakly (parameters must not keep it alive); a
    zero.Init partition (strong) lives as long as its parameters."""
    param._zf_owner = (lambda: owner) if strong else weakref.ref(owner)
    param.ds_id = ds_id
    param.ds_shape = torch.Size(shape)
    param.ds_numel = torch.Size(shape).numel()
    param.ds_status = ZeroParamStatus.AVAILABLE if not is_released(param) else ZeroParamStatus.NOT_AVAILABLE


def detach_owner(param):
    """`param` stops being partitioned (its values must be in .data already)."""
    if is_released(param):
        param.__class__ = type(param)._zf_original_class
    for name in ("_zf_owner", "ds_id", "ds_shape", "ds_numel", "ds_status", "ds_tensor"):
        if hasattr(param, name):
            delattr(param, name)


def release(param):
    """Drop the values: an empty tensor of the same dtype and device, the stand-in class."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    if not is_released(param):
        param.__class__ = _released_class(type(param))
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE


def mark_inflight(param):
    param.ds_status = ZeroParamStatus.INFLIGHT


def make_available(param, values: torch.Tensor):
    """The parameter's values are `values` (a view of a gathered buffer, its full shape)."""
    if is_released(param):
        param.__class__ = type(param)._zf_original_class
    param.data = values
    param.ds_status = ZeroParamStatus.AVAILABLE
