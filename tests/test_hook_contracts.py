"""The hook contracts: specs typed and documented, docs in step, adapters matching the specs,
dispatch once in the plugin manager, options and install hints from one place.

Nothing here imports a framework: adapter sources are read with ``ast``.
"""
import ast
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pluggy
import pytest

from dopt import DoptError, hookspecs
from dopt import plugin_manager as P
from dopt.calib.loop import DEFAULT_ALGORITHM, range_observer, resolve_algorithm
from dopt.errors import EXTRAS, install_hint

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
BUILTIN_ADAPTERS = {"torch", "onnx", "tensorflow", "llm"}
hookimpl = pluggy.HookimplMarker("dopt")


def pyproject_extras() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return set(doc["project"]["optional-dependencies"])


# --- the specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(hookspecs.specs()))
def test_hookspec_is_typed_and_documented(name):
    fn = hookspecs.specs()[name]
    sig = inspect.signature(fn)
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type"
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}): no type"
        assert f":param {p.name}:" in doc, f"{name}: parameter {p.name} is not described"
    assert ":returns:" in doc, f"{name}: the return value is not described"
    first = hookspecs.is_firstresult(name)
    assert f":firstresult: {'yes' if first else 'no'}" in doc, \
        f"{name}: the docstring must say ':firstresult: {'yes' if first else 'no'}'"
    if hookspecs.is_operation(name):
        assert first, f"{name}: an operation (adapter argument) must be firstresult"


def test_hookspec_annotations_resolve():
    # the string annotations name real types (TYPE_CHECKING imports included)
    ns = dict(vars(hookspecs))
    import dopt.dopt_llm.opt_main as llm_main
    import dopt.quant.observers as observers
    import dopt.ptq as ptq
    ns.update(LlmJob=llm_main.LlmJob, RangeObserver=observers.RangeObserver, PtqJob=ptq.PtqJob,
              onnx=type(sys)("onnx"))
    ns["onnx"].ModelProto = object
    for name, fn in hookspecs.specs().items():
        typing.get_type_hints(fn, globalns=ns)


def test_adapter_info_typeddict_covers_what_adapters_return():
    keys = set(hookspecs.AdapterInfo.__annotations__)
    assert {"name", "framework", "extra", "accepts", "operations", "strategies",
            "options"} <= keys
    assert hookspecs.AdapterInfo.__required_keys__ == {"name", "framework"}
    infos = P.adapters()
    assert BUILTIN_ADAPTERS <= set(infos)
    for name in BUILTIN_ADAPTERS:
        info = infos[name]
        assert set(info) <= keys, f"{name}: keys outside AdapterInfo: {set(info) - keys}"
        assert set(info) == keys, f"{name}: a built-in adapter gives every key"
        assert info["name"] == name and isinstance(info["framework"], str)
        assert all(isinstance(x, str) for x in info["operations"] + info["strategies"])
        assert set(info["options"]) <= P.OPTION_OPERATIONS


# --- docs ----------------------------------------------------------------------------------


def test_docs_list_every_hook_and_no_other():
    text = DOCS.read_text("utf-8")
    documented = set(re.findall(r"^\| `(dopt_\w+)\(", text, flags=re.M))
    specs = set(hookspecs.specs())
    assert not specs - documented, f"hooks missing from docs/plugins.md: {specs - documented}"
    assert not documented - specs, f"docs/plugins.md lists hooks that do not exist: " \
                                   f"{documented - specs}"
    assert hookspecs.markdown_table() in text, \
        "docs/plugins.md's hook table is stale: paste the output of `python -m dopt.hookspecs`"


def test_docs_name_every_declared_option():
    text = DOCS.read_text("utf-8")
    for name, info in P.adapters().items():
        for op, names in info.get("options", {}).items():
            for n in names:
                assert f"`{n}`" in text, f"option {n} of {name}.{op} is not in docs/plugins.md"


# --- adapters against the specs ------------------------------------------------------------


def test_builtin_adapters_load_and_pass_check_pending():
    pm = P.new_plugin_manager()
    assert not BUILTIN_ADAPTERS & set(pm.broken), pm.broken
    assert BUILTIN_ADAPTERS <= {n for n, _ in pm.list_name_plugin()}
    pm.check_pending()
    specs = set(hookspecs.specs())
    for name in BUILTIN_ADAPTERS:
        plugin = pm.get_plugin(name)
        for hc in pm.get_hookcallers(plugin):
            assert hc.name in specs and hc.has_spec(), f"{name}: {hc.name}"
            for impl in hc.get_hookimpls():
                if impl.plugin is plugin and hc.name in P.OPERATIONS:
                    # dispatch is the manager's: implementations do not test `adapter`
                    assert "adapter" not in impl.argnames, f"{name}.{hc.name}"


def test_aciq_plugin_passes_the_check():
    sys.path.insert(0, str(ROOT / "plugins" / "dopt-aciq"))
    try:
        import dopt_aciq.plugin as aciq
    finally:
        sys.path.remove(str(ROOT / "plugins" / "dopt-aciq"))
    pm = P.new_plugin_manager(entry_points=False)
    assert P.register_plugin(aciq, "aciq", pm=pm) == "aciq"
    pm.check_pending()
    algs = {}
    for d in pm.hook.dopt_range_algorithms():
        algs.update(d)
    assert {"aciq", "aciq_gauss", "minmax"} <= set(algs)


class Typo:
    @hookimpl
    def dopt_optimise_model(self, model, config_path, options):
        return model


def test_misspelt_hookimpl_is_an_error_naming_plugin_and_hook():
    pm = P.new_plugin_manager(entry_points=False)
    plugin = Typo()
    with pytest.raises(DoptError) as e:
        pm.register(plugin, name="typo")
    msg = str(e.value)
    assert "dopt plugin 'typo'" in msg and "'dopt_optimise_model'" in msg
    assert "did you mean 'dopt_optimize_model'" in msg
    assert not pm.is_registered(plugin) and pm.get_plugin("typo") is None
    pm.check_pending()  # nothing of the refused plugin is left behind
    with pytest.raises(DoptError, match="dopt_optimise_model"):
        P.register_plugin(plugin, "typo", pm=pm)


def test_optional_hookimpl_for_another_version_is_allowed():
    class Later:
        @hookimpl(optionalhook=True)
        def dopt_some_future_hook(self):
            return 1

    pm = P.new_plugin_manager(entry_points=False)
    assert pm.register(Later(), name="later") == "later"


def test_wrong_arguments_name_plugin_and_hook():
    class BadArgs:
        @hookimpl
        def dopt_adapter_info(self):
            return {"name": "bad", "framework": "X"}

        @hookimpl
        def dopt_optimize_model(self, model, cfg_path):
            return model

    pm = P.new_plugin_manager(entry_points=False)
    plugin = BadArgs()
    with pytest.raises(DoptError) as e:
        pm.register(plugin, name="badargs")
    assert "'badargs'" in str(e.value) and "dopt_optimize_model" in str(e.value)
    assert "cfg_path" in str(e.value)
    assert not pm.is_registered(plugin) and "bad" not in {
        i["name"] for i in pm.hook.dopt_adapter_info()}


def test_operation_needs_adapter_info_and_unique_name():
    class NoInfo:
        @hookimpl
        def dopt_get_quant_loss(self, model):
            return 0

    pm = P.new_plugin_manager(entry_points=False)
    with pytest.raises(DoptError, match="'noinfo' implements dopt_get_quant_loss but not "
                                        "dopt_adapter_info"):
        pm.register(NoInfo(), name="noinfo")

    class Dup:
        @hookimpl
        def dopt_adapter_info(self):
            return {"name": "torch", "framework": "another torch"}

    pm = P.new_plugin_manager()
    with pytest.raises(DoptError, match="names adapter 'torch', which another plugin"):
        pm.register(Dup(), name="dup")

    class BadOptions:
        @hookimpl
        def dopt_adapter_info(self):
            return {"name": "bo", "framework": "X", "options": {"get_quant_loss": ["x"]}}

    with pytest.raises(DoptError, match="declares options for 'get_quant_loss'"):
        P.new_plugin_manager(entry_points=False).register(BadOptions(), name="bo")


def test_misspelt_entry_point_plugin_is_reported_not_ignored(tmp_path):
    (tmp_path / "typo_plugin_for_dopt.py").write_text(
        "import pluggy\nhookimpl = pluggy.HookimplMarker('dopt')\n\n"
        "@hookimpl\ndef dopt_range_algorithms():\n    return {'typo_alg': object}\n\n"
        "@hookimpl\ndef dopt_optimise_model(model, config_path, options):\n    return model\n")
    dist = tmp_path / "typo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dopt]\ntypo = typo_plugin_for_dopt\n")
    r = subprocess.run([sys.executable, "-m", "dopt", "adapters"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("broken plugin typo:"))
    assert "'dopt_optimise_model'" in line and "dopt_optimize_model" in line
    assert "typo_alg" not in r.stdout  # the refused plugin is not half registered
    assert "dopt plugin 'typo'" in r.stderr  # the warning


# --- dispatch -----------------------------------------------------------------------------


def _adapter(name, calls):
    class Adapter:
        @hookimpl
        def dopt_adapter_info(self):
            return {"name": name, "framework": name.upper()}

        @hookimpl
        def dopt_get_quant_loss(self, model):
            calls.append(name)
            return f"{name}:{model}"

    return Adapter()


def test_operations_reach_only_the_named_adapter():
    calls = []
    pm = P.new_plugin_manager(entry_points=False)
    pm.register(_adapter("a", calls), name="plugin_a")
    pm.register(_adapter("b", calls), name="plugin_b")

    class OldStyle:  # a third-party adapter still testing `adapter` keeps working
        @hookimpl
        def dopt_adapter_info(self):
            return {"name": "old", "framework": "Old"}

        @hookimpl
        def dopt_get_quant_loss(self, adapter, model):
            calls.append("old")
            return None if adapter != "old" else "old"

    class Wrapper:  # wrappers of every plugin still wrap the call
        @hookimpl(wrapper=True)
        def dopt_get_quant_loss(self, model):
            result = yield
            calls.append(f"wrapped {result}")
            return result

    pm.register(OldStyle(), name="old")
    pm.register(Wrapper(), name="wrapper")
    assert pm.hook.dopt_get_quant_loss(adapter="a", model=1) == "a:1"
    assert calls == ["a", "wrapped a:1"]
    calls.clear()
    assert pm.hook.dopt_get_quant_loss(adapter="old", model=1) == "old"
    assert calls == ["old", "wrapped old"]
    calls.clear()
    assert pm.hook.dopt_get_quant_loss(adapter="missing", model=1) is None
    assert calls == ["wrapped None"]
    calls.clear()
    pm.unregister(name="plugin_a")
    assert pm.hook.dopt_get_quant_loss(adapter="a", model=1) is None
    assert pm.hook.dopt_get_quant_loss(adapter="b", model=2) == "b:2"


def test_old_call_form_dispatches_on_the_builtin_adapters():
    # what adapters/tensorflow/so.py and dopt/dopt_so.py do: pm.hook.dopt_quantize_file(adapter=)
    pm = P.new_plugin_manager()
    assert {i.plugin_name for i in pm.hook.dopt_quantize_file.get_hookimpls()} >= \
        {"torch", "onnx", "tensorflow"}
    seen = []
    undo = pm.add_hookcall_monitoring(
        lambda hook, impls, kwargs: seen.append([i.plugin_name for i in impls]),
        lambda outcome, hook, impls, kwargs: None)
    try:
        assert pm.hook.dopt_quantize_file(adapter="nosuch", job=None) is None
        with pytest.raises(Exception):  # the onnx adapter alone gets the (bogus) job
            pm.hook.dopt_quantize_file(adapter="onnx", job=None)
    finally:
        undo()
    assert seen == [[], ["onnx"]]


def test_call_adapter_errors():
    with pytest.raises(DoptError, match="the 'onnx' adapter does not implement get_quant_loss"):
        P.call_adapter("onnx", "get_quant_loss", model=object())
    with pytest.raises(DoptError, match="the dopt 'nosuch' adapter is not installed"):
        P.call_adapter("nosuch", "dopt_get_quant_loss", model=object())
    with pytest.raises(ValueError, match="not an adapter operation"):
        P.call_adapter("torch", "claim_model", model=object())


# --- options ------------------------------------------------------------------------------


def test_unknown_options_are_refused_with_the_accepted_names():
    pm = P.get_plugin_manager()
    with pytest.raises(DoptError) as e:
        pm.check_options("torch", "optimize_model", {"quant_flag": True})
    assert "unknown option 'quant_flag'" in str(e.value) and "accepts none" in str(e.value)
    with pytest.raises(DoptError) as e:
        pm.check_options("tensorflow", "dopt_optimize_model", {"is_train": 1})
    assert "unknown option 'is_train'" in str(e.value)
    assert "one of is_train_flag, quant_flag" in str(e.value)
    assert pm.check_options("tensorflow", "optimize_model", {"quant_flag": None}) == \
        {"quant_flag": None}
    assert pm.check_options("llm", "optimize_model", {"data": {}}) == {"data": {}}
    # the old call form is checked too: the manager validates in the dispatch itself
    with pytest.raises(DoptError, match="unknown option 'bogus'"):
        pm.hook.dopt_optimize_model(adapter="torch", model=None, config_path="c.json",
                                    options={"bogus": 1})


def test_dopt_optimize_model_refuses_unknown_options_for_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import dopt
    with pytest.raises(DoptError, match="optimize_model\\(\\) got an unknown option 'flag'"):
        dopt.optimize_model(torch.nn.Linear(2, 2), str(tmp_path / "c.json"), flag=1)
    with pytest.raises(DoptError, match="unknown option 'opset'"):
        dopt.generate_final_model(torch.nn.Linear(2, 2), "c.json", opset=13)


def test_keras_path_refuses_tf1_only_options():
    from dopt_adapters.tensorflow.plugin import _keras_options
    assert _keras_options("optimize_model", {"is_train_flag": None, "quant_flag": None}) == {}
    with pytest.raises(DoptError, match="option 'quant_flag' applies to a tf.compat.v1.Session"):
        _keras_options("optimize_model", {"is_train_flag": None, "quant_flag": "q"})


def _params(rel: str, func: str) -> list[str]:
    tree = ast.parse((ROOT / "adapters" / rel).read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            a = node.args
            return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    raise AssertionError(f"{rel} has no function {func}")


# the adapter functions each operation's options are passed to
OPTION_TARGETS = {
    ("torch", "generate_config_file"): [("torch/api.py", "generate_config_file")],
    ("torch", "optimize_model"): [("torch/api.py", "optimize_model")],
    ("torch", "generate_final_model"): [("torch/export.py", "generate_final_model")],
    ("tensorflow", "generate_config_file"): [("tensorflow/tf1_api.py", "generate_config_file")],
    ("tensorflow", "optimize_model"): [("tensorflow/tf1_api.py", "optimize_model")],
    ("tensorflow", "generate_final_model"): [("tensorflow/tf1_export.py",
                                              "generate_final_model")],
    ("llm", "optimize_model"): [("llm/model_opt.py", "optimize_model")],
}


def test_declared_options_are_parameters_of_the_adapter_functions():
    infos = P.adapters()
    for (adapter, op), targets in OPTION_TARGETS.items():
        declared = infos[adapter]["options"].get(op, [])
        for rel, func in targets:
            params = _params(rel, func)
            missing = [n for n in declared if n not in params]
            assert not missing, f"{adapter}.{op} declares {missing}, which {rel}:{func} lacks"
    for adapter in ("torch", "tensorflow", "llm"):
        for op in infos[adapter]["options"]:
            assert (adapter, op) in OPTION_TARGETS, f"test does not know {adapter}.{op}"


# --- install hints ------------------------------------------------------------------------


def test_every_install_hint_names_an_existing_extra():
    extras = pyproject_extras()
    assert set(EXTRAS.values()) <= extras
    for name, info in P.adapters().items():
        if name in BUILTIN_ADAPTERS:
            assert info["extra"] in extras and info["extra"] == EXTRAS[name], name
    hinted = {}
    for folder in ("dopt", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"dopt\[([\w,-]+)\]", path.read_text("utf-8")):
                for extra in m.group(1).split(","):
                    hinted.setdefault(extra, []).append(str(path.relative_to(ROOT)))
    hinted.pop("extra", None)  # f"dopt[{extra}]" templates
    bad = {k: v for k, v in hinted.items() if k not in extras}
    assert not bad, f"install hints naming extras pyproject.toml lacks: {bad}"
    assert install_hint("tf") == "pip install 'dopt[tf]'"


def test_missing_tensorflow_adapter_hints_the_tf_extra():
    code = ("import dopt\nfrom dopt.dopt_tf.opt_main import optimize_model\n"
            "try:\n    optimize_model(object(), 'c.json')\n"
            "except dopt.DoptError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=dict(os.environ,
                                                       DOPT_DISABLE_PLUGINS="tensorflow"))
    assert "the dopt 'tensorflow' adapter is not installed" in r.stdout, r.stdout + r.stderr
    assert "pip install 'dopt[tf]'" in r.stdout and "dopt[tensorflow]" not in r.stdout
    assert "DOPT_DISABLE_PLUGINS" in r.stdout


# --- range algorithms ---------------------------------------------------------------------


def test_resolve_algorithm_is_the_one_check():
    assert resolve_algorithm(None) == resolve_algorithm("auto") == DEFAULT_ALGORITHM
    assert resolve_algorithm("minmax", default=None) == "minmax"
    with pytest.raises(DoptError) as e:
        resolve_algorithm("minmx", file="c.json", field="layer_strategy.fc.activation_range",
                          layer="fc")
    msg = str(e.value)
    assert "file 'c.json', field 'layer_strategy.fc.activation_range'" in msg
    assert "unknown activation range algorithm 'minmx' for layer 'fc'" in msg
    assert "did you mean 'minmax'" in msg and "auto or one of" in msg
    with pytest.raises(DoptError, match="unknown activation range algorithm 'auto'"):
        resolve_algorithm("auto", default=None)
    with pytest.raises(DoptError, match="unknown activation range algorithm 'nope'"):
        range_observer("nope")
    assert range_observer("minmax")().name == "minmax"
