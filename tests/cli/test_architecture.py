"""The layout shows the architecture: kernels (precomputed/, align/, ffn/) never import the
services or the CLI, and no two top-level folders import each other (directly or round a
longer loop). The README's command table and `exaconnect --help` name the same commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Top-level folders and the package each is installed as (pyproject.toml's package-dir).
FOLDERS = {"exaconnect": "exaconnect", "precomputed": "exaconnect.precomputed", "services": "exaconnect.services",
           "ffn": "exaconnect.ffn", "align": "exaconnect.align", "viewer": "exaconnect.viewer",
           "montage": "exaconnect.montage"}
PACKAGES = {package: folder for folder, package in FOLDERS.items()}
# What each kernel folder may import from the others.
ALLOWED = {
    "precomputed": set(),
    "align": {"precomputed"},
    "ffn": {"precomputed"},
    "viewer": {"precomputed"},
    "montage": {"precomputed"},
    "services": {"precomputed", "align", "ffn", "viewer", "montage"},
}


# Leaves every folder may use: the exception classes and the version (they import nothing).
SHARED_LEAVES = ("exaconnect", "exaconnect.errors")


def _folder_of(module: str) -> str | None:
    if module in SHARED_LEAVES:
        return None
    best = None
    for package, folder in PACKAGES.items():
        if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(PACKAGES.get(best, ""))):
            best = package
    if best is None:
        return None
    folder = PACKAGES[best]
    # exaconnect.<x> where x is not another folder's package stays in exaconnect/.
    return folder


def imported_modules(folder: str) -> set[str]:
    """Every module of ours that the files of `folder` import (absolute names)."""
    out: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out |= {alias.name for alias in node.names if alias.name.startswith("exaconnect")}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module.startswith("exaconnect"):
                    out.add(node.module)
    return out


# What exaconnect/ (the CLI and the pipeline) imports from the kernels directly instead of through
# services/, and why. Anything else goes through a service; a new direct import fails the test
# below until it is listed here with its reason.
EDGE_IMPORTS = {
    "exaconnect.precomputed.bbox": "boxes and triples parsed at the edge (--bbox, --resolution)",
    "exaconnect.precomputed.layers": "layer names normalised once, at the edge; `layer info` reads one info file",
    "exaconnect.precomputed.config_loader": "the one strict config loader, for the pipeline file",
    "exaconnect.precomputed.synthetic": "the built-in sample that `exaconnect sample` and the pipeline's source write",
    "exaconnect.precomputed.store": "the run's config and summary JSON beside its output",
    "exaconnect.precomputed.stitching": "MatchOptions, a config type of the segment verbs",
    "exaconnect.precomputed.verify": "`layer verify`: a read-only check of one layer in this process",
    "exaconnect.precomputed.checksums": "switching checksum verification off for this process (`--no-verify-checksums`)",
    "exaconnect.precomputed.evaluate_report": "`evaluate`: one comparison in this process, no queue",
    "exaconnect.precomputed.skeleton_metrics": "`evaluate`: kimimaro parameters of the command line",
    "exaconnect.ffn.config": "inference options validated at the edge",
    "exaconnect.ffn.device": "`doctor` and `queue work --device`: what this process's device layer sees",
    "exaconnect.ffn.predictor": "`segment box`: one box in this process (the interactive path)",
    "exaconnect.ffn.inference": "`segment box`: one box in this process (the interactive path)",
    "exaconnect.ffn.fill": "`segment box --fill-unsegmented`",
    "exaconnect.ffn.training": "`train run|sweep summary`: training in this process; its queue tasks are in services/train.py",
    "exaconnect.align.match": "alignment options validated at the edge (defaults scale with the section size)",
    "exaconnect.viewer": "`view` and `link` serve and name files; they enqueue nothing",
}


def test_the_cli_and_pipeline_reach_kernels_only_through_services_or_say_why():
    kernels = tuple(FOLDERS[f] for f in FOLDERS if f not in ("exaconnect", "services"))
    direct = {m for m in imported_modules("exaconnect") if m.startswith(tuple(k + "." for k in kernels) + kernels)}
    unexplained = sorted(m for m in direct
                         if not any(m == allowed or m.startswith(allowed + ".") for allowed in EDGE_IMPORTS))
    assert not unexplained, f"exaconnect/ imports kernels directly without a reason in EDGE_IMPORTS: {unexplained}"


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {folder: set() for folder in FOLDERS}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            module = ".".join([package, *parts])
            is_package = path.name == "__init__.py"
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = module.split(".")
                        base = base if is_package else base[:-1]
                        base = base[: len(base) - (node.level - 1)]
                        targets = [".".join(base + ([node.module] if node.module else []))]
                    elif node.module:
                        targets = [node.module]
                for target in targets:
                    other = _folder_of(target)
                    if other and other != folder:
                        graph[folder].add(other)
    return graph


def test_shared_leaves_import_nothing_of_ours():
    for leaf in ("__init__.py", "errors.py"):
        tree = ast.parse((ROOT / "exaconnect" / leaf).read_text())
        imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [n for n in imported if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("exaconnect"))]


def test_kernels_never_import_services_or_the_cli():
    graph = import_graph()
    for folder, allowed in ALLOWED.items():
        assert graph[folder] <= allowed, f"{folder}/ imports {sorted(graph[folder] - allowed)}"


def test_no_cycle_between_top_level_folders():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [node, other]))
            if other not in state:
                visit(other, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself can fail: a fake ffn -> services import is reported."""
    fake = {f: set(v) for f, v in import_graph().items()}
    fake["ffn"].add("services")
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    try:
        test_no_cycle_between_top_level_folders()
    except AssertionError as exc:
        assert "ffn" in str(exc) and "services" in str(exc)
    else:
        raise AssertionError("a cycle went unnoticed")


def readme_commands() -> set[str]:
    """The commands in the README's command table (`| \\`exaconnect NOUN ...\\` | ...`)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return set(re.findall(r"^\| `exaconnect ([a-z-]+)", section, flags=re.M))


def test_readme_command_table_matches_the_cli():
    from exaconnect.cli import commands

    assert readme_commands() == set(commands())


def test_every_noun_verb_in_the_readme_parses():
    """Each `exaconnect NOUN VERB` the README's table shows is a real verb of that noun."""
    from exaconnect.cli import build_parser

    text = (ROOT / "README.md").read_text().split("## Commands", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    parser = build_parser()
    for noun, verbs in re.findall(r"^\| `exaconnect ([a-z-]+) ([a-z|-]+)`", text, flags=re.M):
        for verb in verbs.split("|"):
            try:
                parser.parse_args([noun, verb, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, f"exaconnect {noun} {verb} is not a command"


# The commands of exaconnect 0.1, before the noun-verb shape.
OLD_COMMANDS = ("ingest", "enqueue", "worker", "status", "evaluate", "sample", "demo", "segment", "align", "train",
                "sweep", "train-partition", "link", "view")


def test_every_old_command_still_works_or_has_a_migration_note():
    from exaconnect.cli import commands

    text = (ROOT / "README.md").read_text()
    notes = text.split("### Migrating from the 0.1 commands", 1)[1].split("\n## ", 1)[0]
    migrated = set(re.findall(r"^\| `exaconnect ([a-z-]+)", notes, flags=re.M))
    current = set(commands())
    for old in OLD_COMMANDS:
        assert old in current or old in migrated, f"exaconnect {old}: neither a command nor in the migration notes"
    assert {"enqueue", "worker", "status", "sweep", "train-partition"} <= migrated


def test_the_edge_import_check_finds_an_unexplained_import(monkeypatch):
    monkeypatch.delitem(EDGE_IMPORTS, "exaconnect.viewer")
    try:
        test_the_cli_and_pipeline_reach_kernels_only_through_services_or_say_why()
    except AssertionError as exc:
        assert "exaconnect.viewer" in str(exc)
    else:
        raise AssertionError("an unexplained kernel import went unnoticed")
