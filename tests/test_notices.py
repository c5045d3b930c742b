"""The notice vocabulary is closed: every kind the code sends or matches is declared in
``trainctl.hooks.notices`` (or, in tests, by a plugin's ``PluginSpec(notices=...)``)."""

from __future__ import annotations

import ast
from pathlib import Path

from trainctl.hooks import Every, notices

ROOT = Path(__file__).resolve().parent.parent
CONSTANTS = {name: value for name, value in vars(notices).items() if name.isupper() and isinstance(value, str)}
NOTICE_KIND = {"event.kind", "e.kind", "n.kind", "notice.kind"}  # how hooks and tests spell a notice's kind


def sources(folder: str) -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted((ROOT / folder).rglob("*.py"))]


def literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def kind_uses(tree: ast.AST):
    """Every expression that names a notice kind: ``Notice(kind=X)``, ``x.kind == X``,
    ``x.kind in (X, ...)``, and the argument in a ``kind`` parameter's place of a call to a
    function of the same module (``self._notice(step, X, ...)``)."""
    kind_params = {}  # functions that build a Notice from their ``kind`` parameter
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in node.args.args]
            builds = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Notice" for n in ast.walk(node))
            if "kind" in names and builds:
                kind_params[node.name] = names.index("kind") - (names[:1] == ["self"])
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            yield from (k.value for k in node.keywords if k.arg == "kind" and func in {"Notice", *kind_params})
            if func in kind_params and len(node.args) > kind_params[func]:
                yield node.args[kind_params[func]]
        elif isinstance(node, ast.Compare) and ast.unparse(node.left) in NOTICE_KIND:
            for right in node.comparators:
                yield from (right.elts if isinstance(right, (ast.Tuple, ast.List, ast.Set)) else [right])


def test_every_constant_is_declared_once_with_its_sender_and_data():
    assert set(CONSTANTS.values()) == set(notices.BUILTIN)
    assert len(notices.BUILTIN) >= 20
    for kind in notices.BUILTIN.values():
        assert kind.sender and len(kind.when) > 10, kind.name
        assert all(isinstance(k, str) and v for k, v in kind.data.items()), kind.name


def test_the_code_spells_no_kind_as_a_string_and_names_only_declared_constants():
    problems = []
    for path, tree in sources("trainctl"):
        if path.name == "notices.py":
            continue
        where = path.relative_to(ROOT)
        for node in kind_uses(tree):
            if literal(node) is not None:
                problems.append(f"{where}:{node.lineno}: notice kind {literal(node)!r} as a string: use trainctl.hooks.notices")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "notices" \
                    and node.attr.isupper() and not hasattr(notices, node.attr):
                problems.append(f"{where}:{node.lineno}: notices.{node.attr} is not declared")
    assert not problems, "\n".join(problems)


def test_the_scan_finds_what_it_looks_for():
    bad = ast.parse(
        "class P:\n"
        "    def _notice(self, step, kind, message):\n"
        "        self.run.emit(Notice(step=step, kind=kind, message=message, time=0.0))\n"
        "    def f(self, event):\n"
        "        self._notice(1, 'spelled_out', 'm')\n"
        "        Notice(step=1, kind='literal', time=0.0)\n"
        "        if event.kind in ('a', notices.SAMPLES): ...\n"
    )
    assert sorted(literal(n) for n in kind_uses(bad) if literal(n)) == ["a", "literal", "spelled_out"]


def test_kinds_the_tests_spell_out_are_declared():
    declared = set(notices.BUILTIN)
    trees = sources("tests")
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "NoticeKind":
                declared |= {literal(k.value) for k in node.keywords if k.arg == "name"}
    undeclared = [
        f"{path.name}:{node.lineno}: {literal(node)!r}"
        for path, tree in trees for node in kind_uses(tree)
        if literal(node) is not None and literal(node) not in declared
        and path.name not in ("test_notices.py", "test_bus.py")  # those spell undeclared kinds on purpose
    ]
    assert not undeclared, undeclared


def test_every_n_steps_and_at_the_end():
    every = Every(3)
    assert [s for s in range(1, 11) if every.due(s, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if Every(3, at_end=False).due(s, 10)] == [3, 6, 9]
    assert [s for s in range(1, 11) if Every(0).due(s, 10)] == [10]  # 0: only at the end
    assert not any(Every(0, at_end=False).due(s, 10) for s in range(1, 11))
    try:
        Every(-1)
    except ValueError as exc:
        assert "n >= 0" in str(exc)
    else:
        raise AssertionError("Every(-1) must be refused")


def test_no_builtin_plugin_rederives_its_cadence():
    offenders = [
        f"{path.name}:{node.lineno}"
        for path, tree in sources("trainctl/plugins")
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
        and "step" in ast.unparse(node.left)
    ]
    assert not offenders, f"use trainctl.hooks.Every: {offenders}"


def test_every_declared_kind_is_used_by_the_code():
    used = {
        node.attr
        for path, tree in sources("trainctl") if path.name != "notices.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "notices"
    }
    stale = sorted(set(CONSTANTS) - used)
    assert not stale, f"declared but never sent or matched: {stale}"
