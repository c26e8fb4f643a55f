"""Torch-free checks of the ``[model]`` section: the name, the import path and the keys.

The launcher runs these before it creates a run directory or starts a worker, so a misspelt model,
an unimportable ``package.module:ClassName`` or an unknown key is one paragraph within a second
instead of a worker failure after torch has loaded. Importing torch (seconds) or the user's module
(which imports torch) is what the launcher must not do, so the checks read source code instead:
the built-in registry from ``dist_train/models.py``, torchvision's classifiers from its model
files, the user's class or factory from its module, all with ``ast``, nothing executed.

Only what the source states for certain is reported; anything decided at run time (a name bound
by ``from x import *`` or an assignment, a decorated or inherited constructor) is left to the
worker, whose ``build_model`` runs the same checks on the real objects with the same messages.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.config import ModelConfig
from dist_train.errors import ConfigError
from dist_train.import_path import worker_import_path

# Parameters dtrain fills in itself when a builder or constructor names them; not user keys.
BUILDER_ARGS = ("sample_shape", "num_classes")
# Keys dtrain handles itself for torchvision models (the rest go to the torchvision builder).
TORCHVISION_OPTIONS = ("in_channels", "small_input")
# [model] keys that are ModelConfig fields, not constructor keywords; offered in "did you mean".
MODEL_FIELDS = ("name", "num_classes")


@dataclass(frozen=True)
class Signature:
    """What a constructor or factory accepts by keyword; ``open`` when it takes ``**kwargs``."""

    named: tuple[str, ...]
    open: bool


# ----------------------------------------------------------------------------- messages (shared with models.py)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_kwargs(
    model_name: str, kwargs: dict[str, Any], known: Iterable[str], *, origin: Callable[[str], str] | None = None
) -> None:
    """Every ``[model]`` key must be a keyword the model accepts (for closed signatures only)."""
    known = list(dict.fromkeys(known))
    for key in kwargs:
        if key not in known:
            listing = ", ".join(known) if known else "(none: this model takes no extra keys)"
            where = f"{origin(key)}: " if origin is not None else ""
            raise ConfigError(
                f"{where}unknown key {key!r} in [model] for model {model_name!r}."
                f"{did_you_mean(key, [*known, *MODEL_FIELDS])} Known: {listing}."
            )


def unknown_model_error(name: str, builtin: Iterable[str], others: Iterable[str]) -> ConfigError:
    builtin = sorted(builtin)
    return ConfigError(
        f"unknown model {name!r} in [model] name.{did_you_mean(name, [*builtin, *others])} "
        f"Built-in: {', '.join(builtin)}; torchvision classifiers by name (resnet18, ...); "
        'or your own class as "package.module:ClassName".'
    )


def import_error(spec: str, module_name: str, why: str) -> ConfigError:
    return ConfigError(
        f"[model] name = {spec!r}: cannot import module {module_name!r} ({why}). "
        "Is the package installed, or its directory on PYTHONPATH? The workers import it from the "
        "directory you launch from, then PYTHONPATH."
    )


def split_import_path(spec: str) -> tuple[str, str]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f'[model] name = {spec!r}: expected "package.module:ClassName".')
    return module_name, attr


# ----------------------------------------------------------------------------- the launcher's entry point


def check_model_config(
    model: ModelConfig,
    *,
    search_path: Sequence[str] | None = None,
    origin: Callable[[str], str] | None = None,
) -> None:
    """Raise ConfigError for a model name, import path or key that cannot work. Imports no torch.

    ``search_path``: where the workers will look for an imported model's module (default: the
    current directory, then this interpreter's path, as for ``python -m dist_train``).
    ``origin(key)``: where a ``[model]`` key was set (the config file or a ``--set`` argument).
    """
    path = list(search_path) if search_path is not None else worker_import_path()
    try:
        known = accepted_keys(model.name, path)
    except ConfigError as exc:
        if origin is None:
            raise
        raise ConfigError(f"{origin('name')}: {exc}") from None
    if known is not None:
        check_kwargs(model.name, model.kwargs, known, origin=origin)


def accepted_keys(name: str, search_path: list[str]) -> list[str] | None:
    """The ``[model]`` keys model ``name`` accepts; None when it takes any (``**kwargs``) or only
    the worker can tell. Raises ConfigError for an unknown name or an import path that cannot work."""
    if ":" in name:
        signature = imported_signature(name, search_path)
        if signature is None or signature.open:
            return None
        return [p for p in signature.named if p not in BUILDER_ARGS]
    registry = builtin_signatures()
    if name in registry:
        return [p for p in registry[name].named if p not in BUILDER_ARGS]
    builder = _torchvision_builder(name)
    if builder is None:
        raise unknown_model_error(name, registry, torchvision_names())
    return _torchvision_known_keys(*builder)


# ----------------------------------------------------------------------------- reading source


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _signature_of_function(node: ast.FunctionDef | ast.AsyncFunctionDef, *, drop_first: bool = False) -> Signature:
    args = node.args
    positional = [a.arg for a in args.args]
    if drop_first and not args.posonlyargs:  # a positional-only `self` is not among args.args
        positional = positional[1:]
    named = (*positional, *(a.arg for a in args.kwonlyargs))
    return Signature(tuple(named), args.kwarg is not None)


def _signature_of(node: ast.stmt) -> Signature | None:
    """A def's or class's signature as written; None when decorators or inheritance decide it."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None if node.decorator_list else _signature_of_function(node)
    if isinstance(node, ast.ClassDef):
        if node.decorator_list or node.keywords:  # @dataclass, metaclass=...: generated constructors
            return None
        members = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)}
        init = members.get("__init__")
        if init is None or "__new__" in members or init.decorator_list:
            return None  # inherited or unusual constructor: only the worker can tell
        return _signature_of_function(init, drop_first=True)
    return None


def _module_statements(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Module-level statements, including those inside top-level if/try/with/for blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _module_statements(getattr(node, field, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            yield from _module_statements(handler.body)
        for case in getattr(node, "cases", []) or []:
            yield from _module_statements(case.body)


def _binds(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Import | ast.ImportFrom):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    elif isinstance(node, ast.For | ast.AsyncFor):
        targets = [node.target]
    elif isinstance(node, ast.With | ast.AsyncWith):
        targets = [i.optional_vars for i in node.items if i.optional_vars is not None]
    return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))


@dataclass(frozen=True)
class _Lookup:
    found: bool  # the module binds the name for certain
    missing: bool  # the module cannot have the name
    signature: Signature | None  # when the binding is a plain def/class


def parse_model_source(spec: str, source: bytes, path: Path) -> ast.Module:
    """The module's syntax tree; a syntax error is one paragraph naming file, line and the line's text.

    Python would raise the same error when the workers import the module, after the run directory
    was created and torch loaded, as a traceback per rank."""
    try:
        return ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise syntax_error(spec, exc) from None
    except ValueError as exc:  # null bytes
        raise ConfigError(f"[model] name = {spec!r}: {path} is not Python source ({exc}).") from None


def syntax_error(spec: str, exc: SyntaxError) -> ConfigError:
    """``[model] name = 'm:Net': syntax error in /x/m.py, line 4: '(' was never closed: `super().__init__(`.``"""
    where = f"{exc.filename}, line {exc.lineno}" if exc.lineno else str(exc.filename)
    text = f": `{exc.text.strip()}`" if exc.text and exc.text.strip() else ""
    return ConfigError(
        f"[model] name = {spec!r}: syntax error in {where}: {exc.msg}{text}. Fix the module; the workers "
        "could not import it."
    )


def _mentioned(tree: ast.Module, name: str) -> bool:
    """Whether code (not a comment or a docstring) could bind ``name`` at run time: a use of the name,
    a ``global`` statement, an attribute or a string equal to it (``globals()["Net"] = ...``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == name:
            return True
        if isinstance(node, ast.Attribute) and node.attr == name:
            return True
        if isinstance(node, ast.Global | ast.Nonlocal) and name in node.names:
            return True
        if isinstance(node, ast.Constant) and node.value == name:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
            return True  # code built from strings: only running it can tell
    return False


def _lookup(tree: ast.Module, name: str) -> _Lookup:
    statements = list(_module_statements(tree.body))
    bindings = [s for s in statements if _binds(s, name)]
    if len(bindings) == 1:
        return _Lookup(True, False, _signature_of(bindings[0]))
    if bindings:
        return _Lookup(True, False, None)
    dynamic = any(
        (isinstance(s, ast.ImportFrom) and any(a.name == "*" for a in s.names))
        or (isinstance(s, ast.FunctionDef) and s.name == "__getattr__")
        for s in statements
    )
    # A name the code never mentions (comments and docstrings aside) cannot be set by globals()[...] or setattr.
    return _Lookup(False, not dynamic and not _mentioned(tree, name), None)


def _public_names(tree: ast.Module) -> list[str]:
    names = []
    for s in _module_statements(tree.body):
        if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(s.name)
        elif isinstance(s, ast.Assign):
            names += [t.id for t in s.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


# ----------------------------------------------------------------------------- imported models


def _find_top_level(name: str, search_path: list[str]) -> importlib.machinery.ModuleSpec | None:
    if name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None:
        return sys.modules[name].__spec__
    found = importlib.machinery.PathFinder.find_spec(name, search_path)
    if found is not None:
        return found
    # Other finders (editable installs, zip imports): asked as the worker's import system would.
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(name, None)
        except Exception:  # a third-party finder failing is no verdict on the user's module
            continue
        if spec is not None:
            return spec
    return None


def _find_module(module_name: str, search_path: list[str]) -> tuple[importlib.machinery.ModuleSpec | None, str]:
    """The module's spec without executing any package code; (None, why) when it cannot be imported."""
    parts = module_name.split(".")
    spec = _find_top_level(parts[0], search_path)
    if spec is None:
        return None, f"no module named {parts[0]!r}"
    for i in range(1, len(parts)):
        locations = spec.submodule_search_locations
        if locations is None:
            return None, f"{'.'.join(parts[:i])!r} is a module, not a package"
        child = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(locations))
        if child is None:
            if _extends_path(spec):
                return spec, ""  # the package builds its path at import time: leave it to the worker
            return None, f"no module named {'.'.join(parts[: i + 1])!r}"
        spec = child
    return spec, ""


def _extends_path(spec: importlib.machinery.ModuleSpec) -> bool:
    """Whether a package's ``__init__.py`` may extend its ``__path__`` at import time (pkgutil style)."""
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return False
    try:
        return "__path__" in Path(origin).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True


def imported_signature(spec: str, search_path: list[str]) -> Signature | None:
    """Check that ``package.module:Name`` can be imported and has ``Name``; its signature if the source states it."""
    module_name, attr = split_import_path(spec)
    module_spec, why = _find_module(module_name, search_path)
    if module_spec is None:
        raise import_error(spec, module_name, why)
    if module_spec.name != module_name or not module_spec.origin or not module_spec.origin.endswith(".py"):
        return None  # a compiled module, a namespace package or a dynamic package path: the worker checks
    source_path = Path(module_spec.origin)
    try:
        source = source_path.read_bytes()  # bytes: ast honours a coding declaration as the import would
    except OSError:
        return None  # unreadable here (permissions): the worker's import decides
    tree = parse_model_source(spec, source, source_path)
    first, _, rest = attr.partition(".")
    found = _lookup(tree, first)
    if found.missing:
        raise ConfigError(
            f"[model] name = {spec!r}: module {module_name!r} ({source_path}) has no attribute {first!r}."
            f"{did_you_mean(first, _public_names(tree))}"
        )
    return found.signature if not rest else None


# ----------------------------------------------------------------------------- built-in and torchvision models


def _registered_name(node: ast.stmt, decorator: str) -> str | None:
    """``@decorator("name")`` or ``@decorator()`` on a def: the registered name (the def's by default)."""
    if not isinstance(node, ast.FunctionDef):
        return None
    for dec in node.decorator_list:
        if not isinstance(dec, ast.Call):
            continue
        func = dec.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if called != decorator:
            continue
        for arg in [*dec.args[:1], *(k.value for k in dec.keywords if k.arg == "name")]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return arg.value
        return node.name
    return None


def builtin_signatures() -> dict[str, Signature]:
    """``@register_model("name")`` builders of dist_train/models.py, read from its source."""
    spec = importlib.util.find_spec("dist_train.models")  # dist_train is imported: nothing runs here
    tree = _parse(Path(spec.origin)) if spec is not None and spec.origin else None
    if tree is None:  # pragma: no cover - the package is broken
        return {}
    out = {}
    for node in tree.body:
        name = _registered_name(node, "register_model")
        if name is not None and isinstance(node, ast.FunctionDef):
            out[name] = _signature_of_function(node)
    return out


def _torchvision_model_files() -> list[Path]:
    """torchvision/models/*.py: the classifiers ``list_models(module=torchvision.models)`` lists."""
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    files: list[Path] = []
    for location in spec.submodule_search_locations:
        files += sorted((Path(location) / "models").glob("*.py"))
    return files


def _torchvision_builders(files: Iterable[Path]) -> dict[str, tuple[ast.FunctionDef, ast.Module]]:
    out = {}
    for path in files:
        tree = _parse(path)
        if tree is None:
            continue
        for node in tree.body:
            name = _registered_name(node, "register_model")
            if name is not None and isinstance(node, ast.FunctionDef):
                out[name] = (node, tree)
    return out


def _torchvision_builder(name: str) -> tuple[ast.FunctionDef, ast.Module] | None:
    # Read only the files that define a function of that name: a few ms instead of parsing them all.
    candidates = []
    for path in _torchvision_model_files():
        try:
            if f"def {name}(" in path.read_text(encoding="utf-8"):
                candidates.append(path)
        except OSError:
            continue
    return _torchvision_builders(candidates).get(name)


def torchvision_names() -> list[str]:
    return sorted(_torchvision_builders(_torchvision_model_files()))


def _torchvision_known_keys(builder: ast.FunctionDef, tree: ast.Module) -> list[str] | None:
    """The builder's keywords, dtrain's options and the model class's constructor keywords (from the
    builder's return annotation), as models.py accepts them; None when the class cannot be read."""
    annotation = builder.returns
    if not isinstance(annotation, ast.Name):
        return None
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == annotation.id]
    signature = _signature_of(classes[0]) if len(classes) == 1 else None
    if signature is None:
        return None
    builder_named = _signature_of_function(builder).named
    return [*builder_named, *TORCHVISION_OPTIONS, *(p for p in signature.named if p != "num_classes")]
