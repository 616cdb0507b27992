"""Which Kubernetes API permissions a package's code needs, read from the code itself.

The Python client names every operation `<verb>_[namespaced_]<kind>[_<subresource>]` and
holds its request path in the method's generated code. So: find the client API classes a
package uses (`client.CoreV1Api(...)`), find every method of those classes its code calls or
hands to `watch.Watch().stream` (which calls it with watch=True), and turn each into
(apiGroup, resource, verb) from the method's own path and prefix. Raw REST calls: see below.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client

VERB_PREFIXES = (  # longest first
    ("delete_collection_", "deletecollection"),
    ("read_", "get"),
    ("list_", "list"),
    ("create_", "create"),
    ("patch_", "patch"),
    ("replace_", "update"),
    ("delete_", "delete"),
)


@dataclass(frozen=True, order=True)
class Permission:
    group: str
    resource: str  # plural, with "/subresource" when there is one
    verb: str
    namespaced: bool


@functools.cache
def api_classes() -> dict[str, type]:
    """The client's API classes (CoreV1Api, StorageV1Api, ...; the package loads them lazily)."""
    out = {}
    for name in dir(client):
        if name.endswith("Api") and name != "ApiClient":
            cls = getattr(client, name, None)
            if isinstance(cls, type):
                out[name] = cls
    return out


@functools.cache
def method_target(cls: type, method: str) -> tuple[str, str, bool] | None:
    """(apiGroup, resource, namespaced) of a client method, from its request path."""
    # Client generations differ in where the path literal sits: in the method's
    # _<method>_serialize helper (kubernetes >= 35) or in <method>_with_http_info (older).
    paths: list[str] = []
    for name in (f"_{method}_serialize", f"{method}_with_http_info", method):
        impl = getattr(cls, name, None)
        if impl is not None:
            paths = re.findall(r"'(/apis?/[^']*)'", inspect.getsource(impl))
        if paths:
            break
    if not paths:
        return None
    path = paths[0]
    parts = [p for p in path.split("/") if p]
    if parts[0] == "api":  # /api/v1/...
        group, rest = "", parts[2:]
    else:  # /apis/<group>/<version>/...
        group, rest = parts[1], parts[3:]
    if rest[:1] == ["watch"]:
        return None  # the deprecated watch endpoints; we do not map them
    namespaced = rest[:2] == ["namespaces", "{namespace}"] and len(rest) > 2
    if namespaced:
        rest = rest[2:]
    if not rest or rest[0].startswith("{"):
        return None
    resource = rest[0]
    if len(rest) >= 3 and rest[1] == "{name}":
        resource += "/" + rest[2]
    return group, resource, namespaced


def verb_of(method: str) -> str | None:
    for prefix, verb in VERB_PREFIXES:
        if method.startswith(prefix):
            return verb
    return None


def permission(cls: type, method: str, *, watched: bool = False) -> Permission | None:
    target = method_target(cls, method)
    verb = verb_of(method)
    if target is None or verb is None:
        return None
    group, resource, namespaced = target
    if watched:
        assert verb == "list", f"{method} cannot be watched"
        verb = "watch"
    return Permission(group, resource, verb, namespaced)


def _uses(tree: ast.AST) -> tuple[set[str], list[tuple[str, bool, bool]]]:
    """(API class names referenced, [(attribute, is_called, called_with_watch_true)])."""
    classes = api_classes()
    used_classes = set()
    refs: list[tuple[str, bool, bool]] = []
    called: dict[int, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            watch_kw = any(k.arg == "watch" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
            called[id(node.func)] = watch_kw
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in classes:
                used_classes.add(node.attr)
            refs.append((node.attr, id(node) in called, called.get(id(node), False)))
        elif isinstance(node, ast.Name) and node.id in classes:
            used_classes.add(node.id)
    return used_classes, refs


def permissions_needed(files: list[Path]) -> set[Permission]:
    """Everything the code can ask the API server for: official client calls and raw REST."""
    return client_permissions(files) | {rest_permission(c) for c in rest_calls(files)}


def client_permissions(files: list[Path]) -> set[Permission]:
    classes = api_classes()
    used: set[str] = set()
    refs: list[tuple[str, bool, bool]] = []
    for file in files:
        c, r = _uses(ast.parse(file.read_text(), str(file)))
        used |= c
        refs += r
    out: set[Permission] = set()
    for name in sorted(used):
        cls = classes[name]
        for attr, is_called, watch_kw in refs:
            if not callable(getattr(cls, attr, None)) or attr.startswith("_"):
                continue
            if attr.endswith("_with_http_info"):
                attr = attr[: -len("_with_http_info")]
            if is_called:
                perm = permission(cls, attr, watched=watch_kw and attr.startswith("list_"))
            elif attr.startswith("list_"):
                # handed to watch.Watch().stream(fn, ...), which calls fn(watch=True)
                perm = permission(cls, attr, watched=True)
            else:
                perm = permission(cls, attr)
            if perm is not None:
                out.add(perm)
    return out


def package_files(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------ raw REST calls
#
# A package may also speak HTTP to the API server itself (edge_common.kubeapi does:
# `api.request("GET", path, query=...)`, `api.watch(path, query)`). Then the permission follows
# from the HTTP method and the path, and the path is found by following the expression back
# through the package: string literals and f-strings (module string constants are substituted),
# helper functions that return a path, local assignments, and function parameters (through
# every call site, including `threading.Thread(target=f, args=(...))`).

HTTP_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
              "DELETE": "delete"}
PLACEHOLDER = "{}"


@dataclass(frozen=True)
class RestCall:
    method: str  # GET POST PUT PATCH DELETE, or WATCH
    path: str  # a template: {} where the code fills in a value at run time
    where: str


class _Package:
    def __init__(self, files: list[Path]) -> None:
        self.trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
        self.parent: dict[int, ast.AST] = {}
        self.functions: dict[str, list[ast.FunctionDef]] = {}
        self.constants: dict[str, str] = {}
        self.calls: list[tuple[ast.Call, Path]] = []
        for file, tree in self.trees.items():
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    self.parent[id(child)] = node
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, []).append(node)
                elif isinstance(node, ast.Call):
                    self.calls.append((node, file))
            for stmt in tree.body:
                target, value = None, None
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                    target, value = stmt.targets[0], stmt.value
                elif isinstance(stmt, ast.AnnAssign):
                    target, value = stmt.target, stmt.value
                if (isinstance(target, ast.Name) and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)):
                    self.constants[target.id] = value.value

    def enclosing(self, node: ast.AST) -> ast.FunctionDef | None:
        cur: ast.AST | None = self.parent.get(id(node))
        while cur is not None and not isinstance(cur, ast.FunctionDef):
            cur = self.parent.get(id(cur))
        return cur

    def in_transport(self, node: ast.AST) -> bool:
        """Inside the HTTP client class itself (a class with a `request` method), whose own
        connection calls are the transport, not requests of the service."""
        cur: ast.AST | None = self.parent.get(id(node))
        while cur is not None and not isinstance(cur, ast.ClassDef):
            cur = self.parent.get(id(cur))
        return cur is not None and any(
            isinstance(item, ast.FunctionDef) and item.name == "request" for item in cur.body)

    def resolve(self, expr: ast.AST | None, depth: int = 0) -> set[str]:
        """Every string the expression can evaluate to (templates with {} for the unknown)."""
        if expr is None or depth > 12:
            return set()
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.JoinedStr):
            out = {""}
            for part in expr.values:
                if isinstance(part, ast.Constant):
                    pieces = {str(part.value)}
                elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name)
                      and part.value.id in self.constants):
                    pieces = {self.constants[part.value.id]}
                else:
                    pieces = {PLACEHOLDER}
                out = {a + b for a in out for b in pieces}
            return out
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            # an unknown operand of a concatenation is a value filled in at run time
            left = self.resolve(expr.left, depth + 1) or {PLACEHOLDER}
            right = self.resolve(expr.right, depth + 1) or {PLACEHOLDER}
            return {a + b for a in left for b in right}
        if isinstance(expr, ast.Call):
            name = _called_name(expr.func)
            out = set()
            for fn in self.functions.get(name or "", []):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Return):
                        out |= self.resolve(node.value, depth + 1)
            return out
        if isinstance(expr, ast.Name):
            if expr.id in self.constants:
                return {self.constants[expr.id]}
            scope = self.enclosing(expr)
            if scope is None:
                return set()
            out = set()
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign):
                    if any(isinstance(t, ast.Name) and t.id == expr.id for t in node.targets):
                        out |= self.resolve(node.value, depth + 1)
            params = [a.arg for a in scope.args.args]
            if expr.id in params:
                out |= self._argument_values(scope, params, expr.id, depth)
            return out
        return set()

    def _argument_values(self, fn: ast.FunctionDef, params: list[str], name: str,
                         depth: int) -> set[str]:
        index = params.index(name) - (1 if params and params[0] in ("self", "cls") else 0)
        out: set[str] = set()
        for call, _ in self.calls:
            if _called_name(call.func) == fn.name:
                if 0 <= index < len(call.args):
                    out |= self.resolve(call.args[index], depth + 1)
                for kw in call.keywords:
                    if kw.arg == name:
                        out |= self.resolve(kw.value, depth + 1)
                continue
            # threading.Thread(target=self.fn, args=(...)) and the like
            kws = {kw.arg: kw.value for kw in call.keywords}
            target, args = kws.get("target"), kws.get("args")
            if (target is not None and _called_name(target) == fn.name
                    and isinstance(args, ast.Tuple) and 0 <= index < len(args.elts)):
                out |= self.resolve(args.elts[index], depth + 1)
        return out


def _called_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _has_watch_query(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg == "query" and isinstance(kw.value, ast.Dict):
            for key in kw.value.keys:
                if isinstance(key, ast.Constant) and key.value == "watch":
                    return True
    return False


def rest_calls(files: list[Path]) -> list[RestCall]:
    """Every HTTP request to the API server the code can make, with its path template(s)."""
    pkg = _Package(files)
    out = []
    for call, file in pkg.calls:
        if pkg.in_transport(call):
            continue
        name = _called_name(call.func)
        where = f"{file.name}:{call.lineno}"
        if (name == "request" and len(call.args) >= 2 and isinstance(call.args[0], ast.Constant)
                and call.args[0].value in HTTP_VERBS):
            paths = pkg.resolve(call.args[1])
            api_paths = {p for p in paths if p.startswith(("/api/", "/apis/"))}
            if not api_paths:
                raise AssertionError(f"{where}: cannot tell which API path this request uses")
            method = "WATCH" if _has_watch_query(call) else str(call.args[0].value)
            out += [RestCall(method, p, where) for p in sorted(api_paths)]
        elif name == "watch" and call.args:
            api_paths = {p for p in pkg.resolve(call.args[0]) if p.startswith(("/api/", "/apis/"))}
            out += [RestCall("WATCH", p, where) for p in sorted(api_paths)]
    return out


def parse_path(path: str) -> tuple[str, str, str | None, bool]:
    """(apiGroup, resource[/subresource], literal namespace or None, names one object)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    namespace: str | None = None
    if len(rest) > 2 and rest[0] == "namespaces":
        namespace = None if PLACEHOLDER in rest[1] else rest[1]
        rest = rest[2:]
    assert rest and PLACEHOLDER not in rest[0], f"{path}: no resource in the path"
    resource = rest[0]
    if len(rest) >= 3:
        resource += "/" + rest[2]
    return group, resource, namespace, len(rest) >= 2


def rest_permission(call: RestCall) -> Permission:
    group, resource, _, named = parse_path(call.path)
    namespaced = "/namespaces/" in call.path
    if call.method == "WATCH":
        verb = "watch"
    elif call.method == "GET":
        verb = "get" if named else "list"
    elif call.method == "DELETE" and not named:
        verb = "deletecollection"
    else:
        verb = HTTP_VERBS[call.method]
    return Permission(group, resource, verb, namespaced)


def literal_namespaces(files: list[Path]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> the namespaces the code names literally in its request paths."""
    out: dict[tuple[str, str], set[str]] = {}
    for call in rest_calls(files):
        group, resource, namespace, _ = parse_path(call.path)
        if namespace is not None:
            out.setdefault((group, resource), set()).add(namespace)
    return out
