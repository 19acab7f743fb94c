"""How many of bufferfix's functions are fully annotated (standard library only).

    python3 .ci/annotated.py [--list]    prints "N of M functions fully annotated (P%)"; --list also names the others

A function counts (nested ones and methods included, lambdas not) when its return and every parameter is
annotated, *args and **kwargs included; the first parameter of a method (self, cls) needs none, as for mypy.
"""
import ast
import os
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bufferfix")


def functions(tree):
    """(function, is_method) for every def in the tree."""
    found = []

    def visit(node, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child, in_class))
                visit(child, False)
            else:
                visit(child, isinstance(child, ast.ClassDef))

    visit(tree, False)
    return found


def fully_annotated(function, is_method):
    arguments = function.args
    parameters = arguments.posonlyargs + arguments.args
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)
    if is_method and not static and parameters:
        parameters = parameters[1:]
    parameters = parameters + arguments.kwonlyargs + [a for a in (arguments.vararg, arguments.kwarg) if a]
    return function.returns is not None and all(p.annotation is not None for p in parameters)


def main():
    total, annotated, missing = 0, 0, []
    root = os.path.normpath(os.path.join(PACKAGE, os.pardir))
    for directory, _, files in sorted(os.walk(PACKAGE)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path, encoding="utf-8") as source:
                tree = ast.parse(source.read(), path)
            for function, is_method in functions(tree):
                total += 1
                if fully_annotated(function, is_method):
                    annotated += 1
                else:
                    missing.append("%s:%d %s" % (os.path.relpath(path, root), function.lineno, function.name))
    if "--list" in sys.argv[1:] and missing:
        print("\n".join(missing))
    print("%d of %d functions fully annotated (%.1f%%)" % (annotated, total, 100.0 * annotated / total))


if __name__ == "__main__":
    main()
