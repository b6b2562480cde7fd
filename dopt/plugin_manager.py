"""Load adapters and plugins from the ``dopt`` entry-point group and dispatch to them.

Three rules, all kept here and nowhere else (``docs/plugins.md``):

* **Registration checks the contract.** ``DoptPluginManager.register`` refuses, with a
  ``DoptError`` naming the plugin and the hook, a ``@hookimpl`` whose name is not a dopt
  hook (``dopt_optimise_model``), an implementation whose arguments are not the spec's,
  an operation implemented without ``dopt_adapter_info``, and an adapter name that is
  already taken. Nothing of a refused plugin stays registered. Entry points go through
  the same check; one that fails (to import or the check) is recorded in ``pm.broken``,
  warned about and listed by ``dopt adapters``, and dopt goes on without it. After
  loading, ``pm.check_pending()`` confirms no unknown hook is left.
* **Operations are dispatched once.** A hook whose spec has an ``adapter`` argument is
  called only on the plugin whose ``dopt_adapter_info()["name"]`` is that adapter (hook
  wrappers of all plugins still run). Both ``call_adapter(name, op, ...)`` and the plain
  ``pm.hook.dopt_<op>(adapter=name, ...)`` dispatch this way, so implementations do not
  test ``adapter``.
* **Options are checked once.** ``options`` of an operation must be names the adapter
  declares in ``dopt_adapter_info()["options"][op]``; any other is a ``DoptError`` naming
  it and listing the accepted ones.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import importlib.metadata as md
import os
import warnings
from typing import Any, Mapping, Sequence

import pluggy

from . import hookspecs
from .errors import EXTRAS, DoptError, extra_for, install_hint

# Kept for code that imported the old name: the one mapping is dopt.errors.EXTRAS.
_FRAMEWORK_EXTRAS = EXTRAS

#: Hooks dispatched on their ``adapter`` argument (see the module docstring).
OPERATIONS = frozenset(n for n in hookspecs.specs() if hookspecs.is_operation(n))
#: Operations (without the ``dopt_`` prefix) that take the caller's ``options``.
OPTION_OPERATIONS = frozenset(n[len("dopt_"):] for n in OPERATIONS
                              if "options" in inspect.signature(hookspecs.specs()[n]).parameters)


class _Builtins:
    """The core's own hook implementations."""

    @hookspecs.hookimpl
    def dopt_range_algorithms(self):
        from .quant.observers import BUILTIN_RANGE_ALGORITHMS
        return dict(BUILTIN_RANGE_ALGORITHMS)


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(getattr(impl, "wrapper", False) or impl.hookwrapper)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


class DoptPluginManager(pluggy.PluginManager):
    """pluggy's manager with dopt's registration check and adapter dispatch."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        #: ``{entry-point name: why}`` of plugins that failed to load or the check.
        self.broken: dict[str, str] = {}
        self._adapters: dict[str, tuple[object, hookspecs.AdapterInfo]] | None = None

    # -- registration ------------------------------------------------------------------
    def register(self, plugin, name: str | None = None) -> str | None:
        """Register ``plugin`` and check it against the hook specifications.

        Raises ``DoptError`` (naming the plugin and the hook) and leaves nothing of the
        plugin registered when the check fails; ``ValueError`` as pluggy does for a name
        or plugin registered twice.
        """
        self._adapters = None
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as e:
            self._drop(plugin)
            raise DoptError(f"dopt plugin '{name or self.get_canonical_name(plugin)}' does "
                            f"not match the hook specification: {_one_line(e)}",
                            hint="give the implementation the spec's argument names "
                                 "(dopt/hookspecs.py, docs/plugins.md)") from None
        if registered is None:  # blocked
            return None
        try:
            self._check_plugin(plugin, registered)
        except DoptError:
            self._drop(plugin)
            raise
        return registered

    def unregister(self, plugin=None, name: str | None = None):
        self._adapters = None
        return super().unregister(plugin=plugin, name=name)

    def _drop(self, plugin) -> None:
        self._adapters = None
        if self.is_registered(plugin):
            self.unregister(plugin)

    def _check_plugin(self, plugin, name: str) -> None:
        impls = {hc.name: [i for i in hc.get_hookimpls() if i.plugin is plugin]
                 for hc in self.get_hookcallers(plugin) or []}
        for hook, mine in sorted(impls.items()):
            hc = getattr(self.hook, hook)
            if hc.has_spec() or all(i.optionalhook for i in mine):
                continue
            close = difflib.get_close_matches(hook, list(hookspecs.specs()), n=1)
            raise DoptError(
                f"dopt plugin '{name}' implements '{hook}', which is not a dopt hook",
                expected="a hook of dopt/hookspecs.py"
                         + (f" (did you mean '{close[0]}'?)" if close else ""),
                found=f"{getattr(mine[0].function, '__module__', '?')}."
                      f"{getattr(mine[0].function, '__qualname__', hook)}",
                hint="rename it, or mark it @hookimpl(optionalhook=True) if it is meant for "
                     f"another dopt version; DOPT_DISABLE_PLUGINS={name} skips the plugin")
        ops = sorted(h for h, mine in impls.items()
                     if h in OPERATIONS and any(not _is_wrapper(i) for i in mine))
        if "dopt_adapter_info" not in impls:
            if ops:
                raise DoptError(
                    f"dopt plugin '{name}' implements {', '.join(ops)} but not "
                    f"dopt_adapter_info", expected="an adapter name from dopt_adapter_info: "
                    "operations are called only on the adapter that claimed the model",
                    hint="implement dopt_adapter_info returning {'name': ..., 'framework': ...}")
            return
        for impl in impls["dopt_adapter_info"]:
            if _is_wrapper(impl):
                continue
            try:
                info = impl.function()
            except Exception as e:  # noqa: BLE001 - reported with the plugin's name
                raise DoptError(f"dopt plugin '{name}': dopt_adapter_info raised "
                                f"{e.__class__.__name__}: {e}",
                                hint="it must not import a framework or fail") from None
            self._check_info(name, info)

    def _check_info(self, plugin_name: str, info) -> None:
        where = f"dopt plugin '{plugin_name}': dopt_adapter_info"
        if not isinstance(info, Mapping) or not all(
                isinstance(info.get(k), str) and info.get(k) for k in ("name", "framework")):
            raise DoptError(f"{where} returned no adapter description",
                            expected="a dict with the strings 'name' and 'framework'",
                            found=repr(info)[:200])
        if info["name"] in self._adapter_map(exclude=plugin_name):
            raise DoptError(f"{where} names adapter '{info['name']}', which another plugin "
                            "already provides", hint="pick another adapter name, or block "
                            "the other plugin with DOPT_DISABLE_PLUGINS")
        options = info.get("options")
        if options is not None:
            with_options = OPTION_OPERATIONS
            bad = [k for k in options if k not in with_options] if isinstance(
                options, Mapping) else ["(not a dict)"]
            if bad or not all(isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
                              for v in options.values()):
                raise DoptError(f"{where} declares options for '{bad[0] if bad else '?'}'",
                                field="options",
                                expected="{operation: [option names]} for operations among "
                                         + ", ".join(sorted(with_options)))

    # -- adapters ----------------------------------------------------------------------
    def _adapter_map(self, exclude: str | None = None) -> dict[str, tuple[object, Any]]:
        out = {}
        for impl in self.hook.dopt_adapter_info.get_hookimpls():
            if _is_wrapper(impl) or impl.plugin_name == exclude:
                continue
            info = impl.function()
            if isinstance(info, Mapping) and isinstance(info.get("name"), str):
                out[info["name"]] = (impl.plugin, info)
        return out

    def _adapter_entries(self) -> dict[str, tuple[object, hookspecs.AdapterInfo]]:
        if self._adapters is None:
            self._adapters = self._adapter_map()
        return self._adapters

    def adapter_plugin(self, adapter: str | None):
        """The plugin object that provides ``adapter``, or ``None``."""
        entry = self._adapter_entries().get(adapter) if isinstance(adapter, str) else None
        return entry[0] if entry else None

    def adapter_info(self, adapter: str) -> hookspecs.AdapterInfo | None:
        entry = self._adapter_entries().get(adapter)
        return entry[1] if entry else None

    def check_options(self, adapter: str, op: str, options: Mapping[str, Any] | None
                      ) -> dict[str, Any]:
        """``options`` if the adapter accepts every name for ``op``; else a DoptError."""
        options = dict(options or {})
        op = op[len("dopt_"):] if op.startswith("dopt_") else op
        info = self.adapter_info(adapter)
        declared = info.get("options") if info else None
        if declared is None:  # the adapter does not declare its options: pass them on
            return options
        accepted = list(declared.get(op, ()))
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise DoptError(
                f"{op}() got an unknown option '{unknown[0]}' for the '{adapter}' adapter",
                expected=("one of " + ", ".join(accepted)) if accepted else
                         f"no option (the '{adapter}' adapter's {op} accepts none)",
                found=", ".join(unknown) if len(unknown) > 1 else None,
                hint=f"remove {', '.join(unknown)}")
        return options

    # -- dispatch ----------------------------------------------------------------------
    def _hookexec(self, hook_name: str, methods: Sequence[pluggy.HookImpl],
                  kwargs: Mapping[str, object], firstresult: bool):
        if hook_name in OPERATIONS:
            adapter = kwargs.get("adapter")
            plugin = self.adapter_plugin(adapter)
            methods = [m for m in methods if _is_wrapper(m) or
                       (plugin is not None and m.plugin is plugin)]
            if plugin is not None and "options" in kwargs:
                kwargs = {**kwargs, "options": self.check_options(
                    adapter, hook_name, kwargs["options"])}
        return super()._hookexec(hook_name, methods, kwargs, firstresult)


def _load_entry_points(pm: DoptPluginManager) -> None:
    for ep in md.entry_points(group=hookspecs.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must not break dopt
            why = f"{e.__class__.__name__}: {e}"
        else:
            try:
                pm.register(plugin, name=ep.name)
                continue
            except DoptError as e:
                why = str(e)
        pm.broken[ep.name] = why
        warnings.warn(f"dopt plugin '{ep.name}' ({ep.value}) failed to load: {why}",
                      stacklevel=3)


def new_plugin_manager(*, entry_points: bool = True) -> DoptPluginManager:
    """A fresh manager: the core's built-ins, then (by default) the ``dopt`` entry points.

    ``DOPT_DISABLE_PLUGINS=name1,name2`` blocks entry points (like pytest's ``-p no:name``).
    """
    pm = DoptPluginManager()
    pm.register(_Builtins(), name="dopt.builtins")
    for name in filter(None, os.environ.get("DOPT_DISABLE_PLUGINS", "").split(",")):
        pm.set_blocked(name.strip())
    if entry_points:
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:  # only if a check above was bypassed
        raise DoptError(f"a dopt plugin implements an unknown hook: {_one_line(e)}") from None
    return pm


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> DoptPluginManager:
    return new_plugin_manager()


def register_plugin(plugin, name: str | None = None, *,
                    pm: DoptPluginManager | None = None) -> str | None:
    """Register ``plugin`` (checked: see ``DoptPluginManager.register``); returns its name."""
    return (pm or get_plugin_manager()).register(plugin, name=name)


def adapters() -> dict[str, hookspecs.AdapterInfo]:
    return {info["name"]: info for info in get_plugin_manager().hook.dopt_adapter_info()}


def range_algorithms() -> dict:
    algs: dict = {}
    for d in reversed(get_plugin_manager().hook.dopt_range_algorithms()):
        algs.update(d)
    return algs


def broken_note() -> str:
    """`` (plugins that failed to load: ...)`` or ``""``, for the end of a hint."""
    broken = "; ".join(f"{k}: {v}" for k, v in get_plugin_manager().broken.items())
    return f" (plugins that failed to load: {broken})" if broken else ""


def _unwrap_name(model) -> str:
    t = type(model)
    return f"{t.__module__}.{t.__qualname__}"


def _not_installed(adapter: str) -> DoptError:
    pm = get_plugin_manager()
    if adapter in pm.broken:
        return DoptError(f"the dopt '{adapter}' adapter failed to load", found=pm.broken[adapter],
                         hint=f"fix or reinstall the plugin, or block it with "
                              f"DOPT_DISABLE_PLUGINS={adapter}")
    extra = extra_for(adapter)
    hint = install_hint(extra) if extra else \
        f"install the package that provides the dopt '{adapter}' adapter"
    if pm.is_blocked(adapter):
        hint += f", and remove '{adapter}' from DOPT_DISABLE_PLUGINS"
    return DoptError(f"the dopt '{adapter}' adapter is not installed", hint=hint + broken_note())


def adapter_for(model, *, want: str | None = None) -> str:
    """Name of the adapter that claims ``model``; a clear error when none does."""
    pm = get_plugin_manager()
    claims = [c for c in pm.hook.dopt_claim_model(model=model) if c]
    if want is not None:
        if want in claims:
            return want
        info = pm.adapter_info(want)
        if info is None:
            raise _not_installed(want)
        raise DoptError(f"the {want} API was given an object it cannot handle",
                        expected=info.get("accepts", f"a {info.get('framework')} model"),
                        found=_unwrap_name(model))
    if len(claims) == 1:
        return claims[0]
    if len(claims) > 1:
        raise DoptError("several adapters claim this model", found=", ".join(claims),
                        hint="call the framework's own API, e.g. dopt.dopt_torch.opt_main")
    extra = extra_for(type(model).__module__)
    raise DoptError(
        "no installed dopt adapter handles this model", found=_unwrap_name(model),
        hint=(install_hint(extra) if extra else
              "pass a torch.nn.Module, a Keras model / tf.Session or an ONNX model")
        + broken_note())


def _hook_name(op: str) -> str:
    name = op if op.startswith(hookspecs.PROJECT + "_") else f"{hookspecs.PROJECT}_{op}"
    if name not in OPERATIONS:
        raise ValueError(f"{op!r} is not an adapter operation; operations: "
                         + ", ".join(sorted(OPERATIONS)))
    return name


def call_adapter(adapter: str, op: str, **kwargs):
    """Run operation ``op`` (``"quantize_file"`` or ``"dopt_quantize_file"``) on ``adapter``.

    The same as ``get_plugin_manager().hook.dopt_<op>(adapter=adapter, **kwargs)`` except
    that ``None`` (adapter missing or not implementing ``op``) is a ``DoptError``.
    """
    hook_name = _hook_name(op)
    pm = get_plugin_manager()
    result = getattr(pm.hook, hook_name)(adapter=adapter, **kwargs)
    if result is None:
        if pm.adapter_plugin(adapter) is None:
            raise _not_installed(adapter)
        short = hook_name[len(hookspecs.PROJECT) + 1:]
        raise DoptError(f"the '{adapter}' adapter does not implement {short}",
                        hint="see `dopt adapters` for what each adapter supports")
    return result


def call(op: str, model, *, want: str | None = None, **kwargs):
    """Run operation ``op`` on the adapter that claims ``model`` (``want``: the one required)."""
    name = adapter_for(model, want=want)
    return call_adapter(name, op, model=model, **kwargs)
