"""The seam contract's checker: does the table in `seam_table.py` (every vLLM
internal that feather_vllm patches or reads, and the supported range) hold?

`register()` (the plugin entry point) installs nothing unless the installed
vLLM is in `SUPPORTED` and `check_installed()` finds no mismatch: outside
that, stock vLLM keeps working. `check_source(root)` checks the same table
on an unpacked vLLM source tree without importing it (`ast`), so that the
GPU wheels of other releases can be checked on any machine:

    python -m feather_vllm.kv.seams      # make seams

downloads the vLLM wheels of `RELEASES` (`pip download --no-deps`, cached in
~/.cache/feather-vllm/seams or $FEATHER_VLLM_SEAMS_CACHE), unpacks their
`vllm/**/*.py`, and checks each: a supported release must pass, an
unsupported one must fail. This module imports neither vLLM nor torch at
import time.

What a seam asserts: `seam_table.py`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

from feather_vllm.kv.seam_table import RELEASES, SEAMS, SUPPORTED, Seam

CACHE_ENV = "FEATHER_VLLM_SEAMS_CACHE"


# -- versions ---------------------------------------------------------------

_RELEASE = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)*(?:\.post\d+)?(?:\+[0-9A-Za-z.]+)?$")


def supported_version(version: str) -> bool:
    """True for a release in `SUPPORTED` (0.32.x, 0.33.x; post-releases and
    local builds such as "0.32.0+cpu" included). Pre-releases and dev builds
    are refused: their code may lie anywhere between two releases."""
    match = _RELEASE.match(str(version).strip())
    return match is not None and f"{int(match[1])}.{int(match[2])}" in SUPPORTED


def supported_range() -> str:
    return ", ".join(f"{minor}.x" for minor in SUPPORTED)


# -- the two backends -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "pos", "kwonly", "varargs", "varkw"
    required: bool


class _Missing(Exception):
    """A seam (or the module it lives in) is absent."""


def _canonical(text: str) -> str:
    return ast.unparse(ast.parse(textwrap.dedent(text)))


def _walk_own(node: ast.AST):
    """The nodes of a function's body, not descending into nested scopes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(child))


def _self_assigned(func: ast.AST) -> set[str]:
    """Names X of every `self.X = ...` (plain, annotated, tuple) in `func`."""
    out: set[str] = set()

    def targets(target: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                targets(elt)
        elif isinstance(target, ast.Starred):
            targets(target.value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id == "self":
            out.add(target.attr)

    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                targets(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
    return out


def _statements(body: list[ast.stmt]):
    """Statements of a module or class body, also inside if/try/with blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _statements(block)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)


def _class_members(node: ast.ClassDef) -> set[str]:
    """What one class body defines: methods, properties, nested classes,
    class attributes and annotations (dataclass fields), and `self.X`
    assigned in `__init__` / `__post_init__` or in a method of the class
    that they call (`self._init_x(...)`), transitively."""
    out: set[str] = set()
    methods: dict[str, ast.AST] = {}
    for stmt in _statements(node.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(stmt.name)
            if not isinstance(stmt, ast.ClassDef):
                methods[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            out |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out.add(stmt.target.id)
    pending = [name for name in ("__init__", "__post_init__") if name in methods]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        out |= _self_assigned(methods[name])
        for call in ast.walk(methods[name]):
            func = call.func if isinstance(call, ast.Call) else None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id == "self" and func.attr in methods:
                pending.append(func.attr)
    return out


def _ast_params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[_Param]:
    args = func.args
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [_Param(a.arg, "pos", i < first_default) for i, a in enumerate(positional)]
    if args.vararg:
        out.append(_Param(args.vararg.arg, "varargs", False))
    out += [_Param(a.arg, "kwonly", d is None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(_Param(args.kwarg.arg, "varkw", False))
    return out


def _check_params(seam: Seam, params: list[_Param]) -> list[str]:
    out = []
    positional = [p.name for p in params if p.kind == "pos"]
    if seam.params and positional[:len(seam.params)] != list(seam.params):
        out.append(f"leading parameters ({', '.join(seam.params)}) expected, "
                   f"found ({', '.join(positional)})")
    names = {p.name for p in params if p.kind in ("pos", "kwonly")}
    missing = [k for k in seam.kwargs if k not in names]
    if missing:
        out.append(f"no parameter {', '.join(missing)}")
    if seam.closed:
        known = set(seam.params) | set(seam.kwargs)
        extra = [p.name for p in params if p.required and p.name not in known]
        if extra:
            out.append(f"new required parameter {', '.join(extra)}")
    return out


def _check_body(seam: Seam, func: ast.AST) -> list[str]:
    out = []
    if seam.returns:
        returns = [node for node in _walk_own(func) if isinstance(node, ast.Return)]
        wrong = [node for node in returns
                 if not (isinstance(node.value, ast.Tuple) and len(node.value.elts) == seam.returns)]
        if not returns:
            out.append(f"returns None, not a {seam.returns}-tuple")
        elif wrong:
            out.append(f"returns {ast.unparse(wrong[0].value) if wrong[0].value else 'None'}, "
                       f"not a {seam.returns}-tuple")
    if seam.calls:
        found = [node for node in ast.walk(func) if isinstance(node, ast.Call)]
        for callee, keywords in seam.calls:
            calls = [c for c in found if ast.unparse(c.func) == callee]
            if not calls:
                out.append(f"no call to {callee}")
            elif not any(set(keywords) <= {k.arg for k in c.keywords} for c in calls):
                out.append(f"no call to {callee} passes {', '.join(f'{k}=' for k in keywords)}")
    if seam.source:
        text = ast.unparse(func)
        for snippet in seam.source:
            if _canonical(snippet) not in text:
                out.append(f"source lacks `{snippet}`")
    return out


def _check(seam: Seam, backend: "_Installed | _Source") -> list[str]:
    try:
        target = backend.resolve(seam.module, seam.attr)
        problems = []
        if seam.params or seam.kwargs or seam.closed:
            problems += _check_params(seam, backend.params(target))
        if seam.attrs:
            missing = backend.missing_attrs(target, seam.attrs)
            if missing:
                problems.append(f"no attribute {', '.join(missing)}")
        if seam.returns or seam.calls or seam.source:
            problems += _check_body(seam, backend.function_ast(target))
    except _Missing as exc:
        problems = [str(exc)]
    except Exception as exc:  # noqa: BLE001 - a seam that cannot be read is a mismatch
        problems = [f"cannot be checked ({type(exc).__name__}: {exc})"]
    return [f"{seam.name}: {p}" for p in problems]


_ABSENT = object()


class _Installed:
    """The seams of the imported vLLM (importlib + inspect)."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}
        self._files: dict[str, ast.Module] = {}

    def _module(self, name: str) -> Any:
        if name not in self._modules:
            try:
                self._modules[name] = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001
                self._modules[name] = _Missing(f"module {name} cannot be imported ({type(exc).__name__}: {exc})")
        module = self._modules[name]
        if isinstance(module, _Missing):
            raise module
        return module

    def resolve(self, module: str, attr: str) -> Any:
        """The object; a method as defined (classmethod and staticmethod
        unwrapped), found along the MRO."""
        obj: Any = self._module(module)
        for part in attr.split("."):
            if inspect.isclass(obj):
                found = _ABSENT
                for klass in obj.__mro__:
                    if part in vars(klass):
                        found = vars(klass)[part]
                        break
                if found is _ABSENT:
                    raise _Missing(f"{obj.__name__} has no attribute {part}")
                obj = found.__func__ if isinstance(found, (classmethod, staticmethod)) else found
            else:
                if not hasattr(obj, part):
                    raise _Missing(f"{getattr(obj, '__name__', obj)} has no attribute {part}")
                obj = getattr(obj, part)
        return obj

    def params(self, target: Any) -> list[_Param]:
        kinds = {inspect.Parameter.POSITIONAL_ONLY: "pos", inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
                 inspect.Parameter.KEYWORD_ONLY: "kwonly", inspect.Parameter.VAR_POSITIONAL: "varargs",
                 inspect.Parameter.VAR_KEYWORD: "varkw"}
        # signature() follows __wrapped__: a patched method reports vLLM's own parameters.
        sig = inspect.signature(target)
        return [_Param(p.name, kinds[p.kind],
                       p.default is inspect.Parameter.empty and kinds[p.kind] in ("pos", "kwonly"))
                for p in sig.parameters.values()]

    def missing_attrs(self, cls: Any, attrs: tuple[str, ...]) -> list[str]:
        if not inspect.isclass(cls):
            raise _Missing("not a class")
        found: set[str] = set()
        if dataclasses.is_dataclass(cls):
            found |= {f.name for f in dataclasses.fields(cls)}
        for klass in cls.__mro__:
            found |= set(vars(klass)) | set(vars(klass).get("__annotations__", {}))
        # Attributes set on instances: read the vLLM classes' source, only if needed.
        for klass in cls.__mro__:
            if all(a in found for a in attrs):
                break
            if klass.__module__.split(".")[0] == "vllm":
                found |= self._assigned(klass)
        return [a for a in attrs if a not in found]

    def _assigned(self, klass: type) -> set[str]:
        """`self.X` assigned in `klass.__init__` / `__post_init__` and the
        methods of `klass` they call: from the methods' own source (cheap),
        or from the class statement when a decorator replaced `__init__`."""
        out: set[str] = set()
        pending, seen = ["__init__", "__post_init__"], set()
        while pending:
            name = pending.pop()
            func = vars(klass).get(name)
            if name in seen or not inspect.isfunction(func):
                continue
            seen.add(name)
            if not func.__qualname__.startswith(klass.__qualname__ + "."):
                node = self._class_node(klass)  # e.g. @support_torch_compile's __init__
                return _class_members(node) if node is not None else out
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
            except Exception:  # noqa: BLE001 - no source: nothing to read
                continue
            out |= _self_assigned(tree)
            for call in ast.walk(tree):
                f = call.func if isinstance(call, ast.Call) else None
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self":
                    pending.append(f.attr)
        return out

    def _class_node(self, klass: type) -> ast.ClassDef | None:
        """The class statement of `klass`, from its module's file (parsed
        once; decorators may have replaced its `__init__`)."""
        try:
            path = inspect.getsourcefile(klass)
            if path not in self._files:
                self._files[path] = ast.parse(Path(path).read_text(encoding="utf-8"))
            body = self._files[path].body
        except Exception:  # noqa: BLE001 - no source file: no `self.X` to read
            return None
        node = None
        for part in klass.__qualname__.split("."):
            node = next((n for n in _statements(body) if isinstance(n, ast.ClassDef) and n.name == part), None)
            if node is None:
                return None
            body = node.body
        return node

    def function_ast(self, target: Any) -> ast.AST:
        func = inspect.unwrap(target)
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        return tree.body[0]


class _SourceClass:
    """A class found in a source tree: its node and the module it lives in."""

    def __init__(self, module: str, node: ast.ClassDef) -> None:
        self.module, self.node = module, node


class _Source:
    """The seams of an unpacked vLLM source tree (ast, nothing imported)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def _path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def _tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self._path(module)
            self._trees[module] = ast.parse(path.read_text(encoding="utf-8")) if path else None
        return self._trees[module]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self._path(module) and self._path(module).name == "__init__.py" \
            else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def _lookup(self, module: str, name: str, seen: frozenset = frozenset()) -> Any:
        """What `module.name` is: a _SourceClass, a function node, another
        node (a value), a module name (str), or `...` when it comes from
        outside the tree. Raises _Missing."""
        if (module, name) in seen:
            raise _Missing(f"{module}.{name}: import cycle")
        seen = seen | {(module, name)}
        tree = self._tree(module)
        if tree is None:
            raise _Missing(f"module {module} not found")
        found: Any = None
        stars = []
        for node in _statements(tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return _SourceClass(module, node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == name and node.value is not None:
                found = node
            elif isinstance(node, ast.ImportFrom) and found is None:
                source = self._absolute(module, node)
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        found = ("from", source, alias.name)
            elif isinstance(node, ast.Import) and found is None:
                for alias in node.names:
                    if alias.asname == name or (alias.asname is None and alias.name == name):
                        found = alias.name
        if isinstance(found, tuple):
            _, source, original = found
            if not source.startswith("vllm"):
                return ...
            if self._path(f"{source}.{original}"):
                return f"{source}.{original}"
            return self._lookup(source, original, seen)
        if found is not None:
            return found
        for source in stars:
            if source.startswith("vllm") and self._tree(source) is not None:
                try:
                    return self._lookup(source, name, seen)
                except _Missing:
                    continue
        if self._path(f"{module}.{name}"):
            return f"{module}.{name}"
        raise _Missing(f"module {module} has no {name}")

    def _bases(self, cls: _SourceClass) -> list[_SourceClass]:
        out = []
        for base in cls.node.bases:
            expr = base.value if isinstance(base, ast.Subscript) else base
            try:
                if isinstance(expr, ast.Name):
                    found = self._lookup(cls.module, expr.id)
                elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
                    module = self._lookup(cls.module, expr.value.id)
                    found = self._lookup(module, expr.attr) if isinstance(module, str) else None
                else:
                    found = None
            except _Missing:
                found = None
            if isinstance(found, _SourceClass):
                out.append(found)
        return out

    def _mro(self, cls: _SourceClass) -> list[_SourceClass]:
        out, queue = [], [cls]
        while queue:
            klass = queue.pop(0)
            if any(k.node is klass.node for k in out):
                continue
            out.append(klass)
            queue.extend(self._bases(klass))
        return out

    def resolve(self, module: str, attr: str) -> Any:
        parts = attr.split(".")
        obj = self._lookup(module, parts[0])
        for part in parts[1:]:
            if isinstance(obj, str):
                obj = self._lookup(obj, part)
            elif isinstance(obj, _SourceClass):
                obj = self._member(obj, part)
            else:
                raise _Missing(f"cannot look up {part} in a value")
        return obj

    def _member(self, cls: _SourceClass, name: str) -> ast.AST:
        for klass in self._mro(cls):
            for node in _statements(klass.node.body):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                    return node
        raise _Missing(f"{cls.node.name} has no attribute {name}")

    def params(self, target: Any) -> list[_Param]:
        if not isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise _Missing("not a function")
        return _ast_params(target)

    def missing_attrs(self, target: Any, attrs: tuple[str, ...]) -> list[str]:
        if not isinstance(target, _SourceClass):
            raise _Missing("not a class")
        found = set().union(*(_class_members(klass.node) for klass in self._mro(target)))
        return [a for a in attrs if a not in found]

    def function_ast(self, target: Any) -> ast.AST:
        if not isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise _Missing("not a function")
        return target


def check_installed(seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """Mismatches between `seams` and the imported vLLM, each naming its seam."""
    backend = _Installed()
    return [problem for seam in seams for problem in _check(seam, backend)]


def check_source(root: Path, seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """Mismatches between `seams` and the vLLM source tree under `root` (the
    directory holding the `vllm` package), read with `ast`, never imported."""
    if not (Path(root) / "vllm" / "__init__.py").is_file():
        return [f"{root}: no vllm package here"]
    backend = _Source(Path(root))
    return [problem for seam in seams for problem in _check(seam, backend)]


def refusal() -> str | None:
    """Why the plugin must not install itself in this process (the installed
    vLLM's version is outside `SUPPORTED`, or a seam does not hold), or None."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not supported_version(version):
        return (f"feather_vllm supports vLLM {supported_range()}; the installed vLLM is {version}: "
                "FEATHER pruning is not registered (vLLM itself runs unchanged)")
    mismatches = check_installed()
    if mismatches:
        return (f"feather_vllm: the installed vLLM {version} (supported: {supported_range()}) does not match "
                f"what the plugin patches ({len(mismatches)} mismatches: {'; '.join(mismatches)}): "
                "FEATHER pruning is not registered (vLLM itself runs unchanged)")
    return None


# -- make seams -------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "feather-vllm" / "seams")


def fetch_source(version: str, cache: Path) -> Path:
    """The unpacked `vllm/**/*.py` of vLLM `version`'s wheel (downloaded
    with pip and unpacked once; the wheel is then deleted): the directory
    holding `vllm/`."""
    wheels = cache / "wheels"
    target = cache / "src" / version
    if (target / ".complete").is_file():
        return target
    found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        # Any platform may check: ask for the Linux x86_64 wheel explicitly.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "--quiet", f"vllm=={version}", "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip downloaded no vllm-{version} wheel into {wheels}")
    with zipfile.ZipFile(found[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                wheel.extract(name, target)
    (target / ".complete").write_text(found[-1].name + "\n")
    found[-1].unlink()  # the sources are all a check reads (~60 MB of a ~300 MB wheel)
    return target


def main(argv: list[str] | None = None) -> int:
    """Check `RELEASES` (or the versions given): print one line per version;
    non-zero when a supported release fails or an unsupported one passes."""
    versions = list(argv if argv is not None else sys.argv[1:]) or list(RELEASES)
    cache = cache_dir()
    failed = False
    for version in versions:
        supported = supported_version(version)
        try:
            mismatches = check_source(fetch_source(version, cache))
        except Exception as exc:  # noqa: BLE001
            print(f"{version}: ERROR ({type(exc).__name__}: {exc})", flush=True)
            failed = True
            continue
        summary = f"{len(mismatches)} mismatches: {'; '.join(mismatches)}"
        if supported and not mismatches:
            print(f"{version}: ok", flush=True)
        elif not supported and mismatches:
            print(f"{version}: refused ({summary})", flush=True)
        elif supported:
            print(f"{version}: FAILED, supported but {summary}", flush=True)
            failed = True
        else:
            print(f"{version}: FAILED, every seam holds but {version} is outside the supported range "
                  f"({supported_range()}): extend SUPPORTED once it is validated", flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
