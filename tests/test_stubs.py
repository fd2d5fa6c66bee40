"""python/qlora_rs/_lib.pyi describes the compiled module exactly: the same public names, and for
every function and method the same parameters, in order, with the same defaults."""

import ast
import inspect
from pathlib import Path

import pytest

import qlora_rs
from qlora_rs import _lib

STUB = Path(qlora_rs.__file__).with_name("_lib.pyi")


def _stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _public(names):
    return {n for n in names if not n.startswith("_") or n == "__version__"}


def _stub_params(fn: ast.FunctionDef, *, method: bool):
    args = fn.args.args[1:] if method else fn.args.args
    defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
    return [(a.arg, inspect.Parameter.empty if d is None else ast.literal_eval(d)) for a, d in zip(args, defaults)]


def _runtime_params(obj, *, method: bool):
    params = list(inspect.signature(obj).parameters.values())
    if method:
        params = params[1:]
    return [(p.name, p.default) for p in params]


def _stub_top_level():
    names, functions, classes = set(), {}, {}
    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names, functions, classes


def test_stub_names_match_the_module():
    names, functions, classes = _stub_top_level()
    stubbed = _public(names | set(functions) | set(classes))
    assert stubbed == _public(dir(_lib)), (
        f"in the module only: {sorted(_public(dir(_lib)) - stubbed)}; in the stub only: {sorted(stubbed - _public(dir(_lib)))}"
    )


@pytest.mark.parametrize("name", sorted(_stub_top_level()[1]))
def test_function_signature_matches(name):
    fn = _stub_top_level()[1][name]
    assert _stub_params(fn, method=False) == _runtime_params(getattr(_lib, name), method=False)


@pytest.mark.parametrize("name", sorted(_stub_top_level()[2]))
def test_class_matches(name):
    cls_node = _stub_top_level()[2][name]
    cls = getattr(_lib, name)
    for node in cls_node.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        attr = inspect.getattr_static(cls, node.name)
        if any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
            assert inspect.isdatadescriptor(attr), f"{name}.{node.name} is not a property at run time"
        elif node.name == "__new__":
            stub = _stub_params(node, method=True)
            assert stub == [(p.name, p.default) for p in inspect.signature(cls).parameters.values()]
        else:
            assert _stub_params(node, method=True) == _runtime_params(attr, method=True), f"{name}.{node.name}"
    runtime = {n for n in vars(cls) if not n.startswith("_") or n == "__cuda_array_interface__"}
    stubbed = {n.name for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name != "__new__"}
    assert stubbed == runtime


def test_stub_ships_with_the_package():
    assert STUB.is_file() and STUB.with_name("py.typed").is_file()
