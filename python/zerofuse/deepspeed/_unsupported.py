"""DeepSpeed names zerofuse does not implement: importing them works (so a
script that imports MoE or DeepSpeedTransformerLayer but does not use them
runs), and using one raises one line naming it."""
import types


class NotSupported(NotImplementedError):
    """A DeepSpeed feature that zerofuse does not have."""


class _Placeholder(type):
    """The metaclass of the placeholders: an attribute of one (deepspeed.moe.layer.MoE
    reached by attributes rather than imports) is a placeholder too."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return unsupported(f"{cls._zerofuse_name}.{attr}", cls._zerofuse_what)


def unsupported(name: str, what: str = None):
    """A class standing for DeepSpeed's `name`: calling or instantiating it
    (or subclassing and instantiating) raises NotSupported naming it."""
    message = f"{name}: {what or 'this part of DeepSpeed'} is not supported by zerofuse"

    def refuse(*args, **kwargs):
        raise NotSupported(message)

    return _Placeholder(name.rsplit(".", 1)[-1], (), {
        "__new__": refuse, "__doc__": message, "__module__": name.rsplit(".", 1)[0],
        "_zerofuse_name": name, "_zerofuse_what": what})


def unsupported_module(fullname: str, what: str = None) -> types.ModuleType:
    """A module whose every attribute is unsupported(fullname.attribute); a
    package, so deeper imports resolve the same way."""
    module = types.ModuleType(fullname, f"{fullname}: {what or 'this part of DeepSpeed'} is not supported by zerofuse")
    module.__path__ = []
    module.__zerofuse_unsupported__ = what  # submodules imported below it inherit the description

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return unsupported(f"{fullname}.{attr}", what)

    module.__getattr__ = __getattr__
    return module
