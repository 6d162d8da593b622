"""`import deepspeed` -> zerofuse.deepspeed, for scripts run unmodified
(`zerofuse launch script.py`, `python -m zerofuse.deepspeed script.py`).

A finder at the front of sys.meta_path answers every import of `deepspeed`
or `deepspeed.x.y` with the module object of `zerofuse.deepspeed` /
`zerofuse.deepspeed.x.y` -- the same objects, so nothing is imported or
registered twice. A DeepSpeed module zerofuse does not provide imports as a
module whose every name raises one line when used. When a real DeepSpeed is
installed the alias still wins in this process, and says so once.
"""
import importlib
import importlib.abc
import importlib.util
import sys

_PREFIX = "deepspeed"
_TARGET = "zerofuse.deepspeed"


class _Existing(importlib.abc.Loader):
    """Hands the import system a module that already exists."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


class DeepSpeedAlias(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _PREFIX and not fullname.startswith(_PREFIX + "."):
            return None
        target_name = _TARGET + fullname[len(_PREFIX):]
        module = sys.modules.get(target_name)
        if module is None:
            try:
                module = importlib.import_module(target_name)
            except ModuleNotFoundError as e:
                # Not provided (this module, or a package above it): a placeholder.
                if e.name is None or not (target_name == e.name or target_name.startswith(e.name + ".")):
                    raise
                module = self._unsupported(fullname)
        spec = importlib.util.spec_from_loader(fullname, _Existing(module),
                                               is_package=hasattr(module, "__path__"))
        return spec

    @staticmethod
    def _unsupported(fullname):
        # A DeepSpeed submodule zerofuse does not provide: what the parent has
        # under that name (an unsupported placeholder), or a new placeholder.
        from ._unsupported import unsupported_module

        parent_name, _, leaf = fullname.rpartition(".")
        parent = sys.modules.get(parent_name)
        existing = getattr(parent, leaf, None) if parent is not None else None
        if existing is not None and hasattr(existing, "__path__"):
            return existing
        return unsupported_module(fullname, getattr(parent, "__zerofuse_unsupported__", None))


_installed = False


def install():
    """Put the alias in place for this process (idempotent)."""
    global _installed
    if _installed:
        return
    real = importlib.util.find_spec(_PREFIX) if _PREFIX not in sys.modules else None
    if real is not None and real.origin and "zerofuse" not in real.origin:
        print(f"[zerofuse] a DeepSpeed installation was found ({real.origin}); in this process `import deepspeed` "
              "is zerofuse's compatibility package", file=sys.stderr, flush=True)
    for name in [n for n in sys.modules if n == _PREFIX or n.startswith(_PREFIX + ".")]:
        del sys.modules[name]  # a real DeepSpeed imported earlier must not shadow the alias
    sys.meta_path.insert(0, DeepSpeedAlias())
    _installed = True
