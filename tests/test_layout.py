"""The code's shape, as the README's "How the code is laid out" promises it: imports run one way, from the networks up
to the drivers, no project import hides inside a function, and no function but an argument parser runs past 60 lines.
Read off the source with `ast`, so a new import that climbs back up fails here before a reader meets it."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the README's list, bottom to top: a module may import only modules of a lower rank (toyworld.world paints with
# toyworld.paint, the one pair inside a level)
RANK = {"unet": 1, "vae": 1, "qlayers": 2, "ckpt": 3, "sample": 4, "toyworld.paint": 5, "toyworld.world": 5.5,
        "quant": 6, "train": 7, "eval": 8, "qdp": 9, "studies": 9, "toyworld.toy": 9}
PARSERS = {"parser", "parse_args"}


def module_path(name):
    return ROOT / (name.replace(".", "/") + ".py")


def project_imports(tree):
    """(imported project module, line, at module level?) for every import statement in a module's tree."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in RANK:
                yield name, node.lineno, id(node) in top


def test_the_readme_lists_every_module_in_this_order():
    """Each module stands first on the README's numbered line of its rank (the names before the description)."""
    section = (ROOT / "README.md").read_text().split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    level = {}
    for line in section.splitlines():
        if m := re.match(r"(\d+)\.\s", line):
            for f in re.findall(r"([\w/]+)\.py", re.split(r"\s{2,}", line)[0]):
                level.setdefault(f.replace("/", "."), int(m[1]))
    assert set(level) == set(RANK), set(level) ^ set(RANK)
    below = lambda a, b: (level[a] < level[b]) == (RANK[a] < RANK[b]) or level[a] == level[b] or RANK[a] == RANK[b]
    assert all(below(a, b) for a in RANK for b in RANK), level


@pytest.mark.parametrize("name", sorted(RANK))
def test_imports_run_one_way(name):
    tree = ast.parse(module_path(name).read_text())
    for imported, line, at_top in project_imports(tree):
        if imported == name:          # `import train as module` under __main__: the script's own importable copy
            continue
        assert at_top, f"{name}.py:{line} imports {imported} inside a function or block"
        assert RANK[imported] < RANK[name], f"{name}.py:{line} imports {imported}, which is not below it"


@pytest.mark.parametrize("name", sorted(RANK))
def test_no_function_but_a_parser_runs_past_60_lines(name):
    tree = ast.parse(module_path(name).read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name not in PARSERS
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"{name}.py: {', '.join(long)}"


def test_the_checker_sees_a_climbing_and_a_hidden_import():
    tree = ast.parse("import sample\nimport ckpt as c\ndef f():\n    import train\n")
    assert sorted(project_imports(tree)) == [("ckpt", 2, True), ("sample", 1, True), ("train", 4, False)]
