"""Load adapters and plugins from the ``dopt`` entry-point group and dispatch to them."""
from __future__ import annotations

import functools
import importlib.metadata as md
import os
import warnings

import pluggy

from . import hookspecs
from .errors import DoptError

# Which extra brings the framework a model object comes from (by its top-level module).
_FRAMEWORK_EXTRAS = {"torch": "torch", "tensorflow": "tf", "keras": "tf", "tf_keras": "tf",
                     "onnx": "onnx", "transformers": "llm"}


class _Builtins:
    """The core's own hook implementations."""

    @hookspecs.hookimpl
    def dopt_range_algorithms(self):
        from .observers import BUILTIN_RANGE_ALGORITHMS
        return dict(BUILTIN_RANGE_ALGORITHMS)


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_Builtins(), name="dopt.builtins")
    pm.broken = {}
    # DOPT_DISABLE_PLUGINS=name1,name2 blocks entry points (like pytest's -p no:name)
    for name in filter(None, os.environ.get("DOPT_DISABLE_PLUGINS", "").split(",")):
        pm.set_blocked(name.strip())
    for ep in md.entry_points(group=hookspecs.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # a broken third-party plugin must not break dopt
            pm.broken[ep.name] = f"{e.__class__.__name__}: {e}"
            warnings.warn(f"dopt plugin '{ep.name}' ({ep.value}) failed to load: {e}",
                          stacklevel=2)
    return pm


def adapters() -> dict[str, dict]:
    return {info["name"]: info for info in get_plugin_manager().hook.dopt_adapter_info()}


def range_algorithms() -> dict:
    algs: dict = {}
    for d in reversed(get_plugin_manager().hook.dopt_range_algorithms()):
        algs.update(d)
    return algs


def _unwrap_name(model) -> str:
    t = type(model)
    return f"{t.__module__}.{t.__qualname__}"


def adapter_for(model, *, want: str | None = None) -> str:
    """Name of the adapter that claims ``model``; a clear error when none does."""
    pm = get_plugin_manager()
    claims = [c for c in pm.hook.dopt_claim_model(model=model) if c]
    if want is not None:
        if want in claims:
            return want
        info = adapters().get(want)
        if info is None:
            # adapters are named after the extra that installs them
            raise DoptError(f"the dopt '{want}' adapter is not installed",
                            hint=f"pip install 'dopt[{want}]'")
        raise DoptError(f"the {want} API was given an object it cannot handle",
                        expected=info.get("accepts", f"a {info.get('framework')} model"),
                        found=_unwrap_name(model))
    if len(claims) == 1:
        return claims[0]
    if len(claims) > 1:
        raise DoptError("several adapters claim this model", found=", ".join(claims),
                        hint="call the framework's own API, e.g. dopt.dopt_torch.opt_main")
    top = type(model).__module__.split(".")[0]
    extra = _FRAMEWORK_EXTRAS.get(top)
    broken = "; ".join(f"{k}: {v}" for k, v in pm.broken.items())
    raise DoptError(
        "no installed dopt adapter handles this model", found=_unwrap_name(model),
        hint=(f"pip install 'dopt[{extra}]'" if extra else
              "pass a torch.nn.Module, a Keras model / tf.Session or an ONNX model")
        + (f" (plugins that failed to load: {broken})" if broken else ""))


def call(op: str, model, *, want: str | None = None, **kwargs):
    name = adapter_for(model, want=want)
    hook = getattr(get_plugin_manager().hook, f"dopt_{op}")
    result = hook(adapter=name, model=model, **kwargs)
    if result is None:
        raise DoptError(f"the '{name}' adapter does not implement {op}",
                        hint="see `dopt adapters` for what each adapter supports")
    return result

