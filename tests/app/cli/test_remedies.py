"""Every operation a library error suggests (``Remedy.action``) has a command the CLI names."""
import ast
from pathlib import Path

import mammo_retrieval
from mammo_retrieval.app.cli._common import COMMANDS


def suggested_actions() -> dict[str, str]:
    """action -> the first module suggesting it, from every ``Remedy(text, action)`` call in the package."""
    found = {}
    for path in Path(mammo_retrieval.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Remedy":
                action = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "action"), None)
                if isinstance(action, ast.Constant) and action.value:
                    found.setdefault(action.value, path.name)
    return found


def test_every_suggested_action_has_a_cli_command():
    actions = suggested_actions()
    assert {"status", "export", "ingest"} <= set(actions)  # the scan sees the package's remedies
    assert {a: m for a, m in actions.items() if a not in COMMANDS} == {}
