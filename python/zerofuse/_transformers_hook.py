"""attn_implementation="zerofuse" without a call: after `import zerofuse`,
Hugging Face transformers models accept it.

transformers is not imported here (a second or more of start-up that most
zerofuse users do not need), nor is torch: the registration runs when
transformers' own modeling_utils -- which every model imports, and which
defines the attention registry -- has been imported, or at once if it already
has been. Nothing here imports torch, so `import zerofuse` still works
without it.
"""
import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "transformers.modeling_utils"


def _register():
    try:
        from .integrations.transformers import register
        register()
    except ImportError:
        # A transformers without the attention registries (< 4.48) or no torch:
        # the model then refuses "zerofuse" itself, naming it.
        pass
    except Exception as e:  # never break the user's `import transformers`
        warnings.warn(f"zerofuse: could not register attn_implementation='zerofuse' with transformers "
                      f"({type(e).__name__}: {e}); zerofuse.optimize(model) still switches a model to it",
                      RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers.modeling_utils is about to be
    imported, it wraps the real loader so that registration follows it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        uninstall()  # once; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _register()

        spec.loader.exec_module = exec_module  # this module's loader instance only
        return spec


_FINDER = _RegisterAfterImport()


def install():
    if _TARGET in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall():
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
