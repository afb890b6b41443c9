"""The package's layout: every module says what it holds, and imports point only up the layers
(utils, then modeling with config.py, engine and data, analysis and export, then inference and
the API), so that a newcomer finds the paper in ``modeling/`` and the FastReID glue in ``engine/``."""
import ast
import os

from tiny_runs import ROOT

PACKAGE = os.path.join(ROOT, "projects", "PromptSG", "promptsg")
# layer of each top-level name under promptsg/; a module may import from its layer or a lower one
LAYERS = {"utils": 0, "modeling": 1, "config": 1, "engine": 2, "data": 2, "analysis": 3, "export": 3,
          "inference": 4, "gallery_index": 4, "api": 5, "__init__": 6}


def modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE)[:-3].split(os.sep), path


def imported(parts, tree):
    """The promptsg modules (as path parts) a module imports, relative and absolute."""
    package = parts[:-1]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
            if node.module:
                yield base + node.module.split(".")
            else:
                for alias in node.names:
                    yield base + [alias.name]
        elif node.module and node.module.split(".")[0] == "promptsg":
            yield node.module.split(".")[1:] or ["__init__"]


def test_every_module_opens_with_a_docstring():
    missing = [path for _, path in modules() if not ast.get_docstring(ast.parse(open(path).read()))]
    assert not missing, missing


def test_imports_point_only_up_the_layers():
    found = set()
    for parts, path in modules():
        if parts == ["data", "__main__"]:
            continue                                      # an entry point: imports the whole package
        layer = LAYERS[parts[0]]
        for target in imported(parts, ast.parse(open(path).read())):
            found.add((parts[0], target[0]))
            assert LAYERS[target[0]] <= layer, f"{'/'.join(parts)}.py imports {'.'.join(target)} (a higher layer)"
    # the check sees the layers' real imports: the model reads utils, the engine reads the model
    assert {("modeling", "utils"), ("engine", "modeling"), ("api", "inference")} <= found
