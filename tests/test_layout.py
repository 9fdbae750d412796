"""The package's shape (docs/contributing.md): layers import only downwards, nothing imports in a
cycle, nothing happens at import time that a user of the library would not expect, and the CLI
offers exactly what the registries hold."""

import ast
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a module may import its own layer and the layers below it (docs/contributing.md).
LAYERS = [
    {"errors", "version", "registry"},
    {"runtime"},
    {"datasets"},
    {"models"},
    {"activations"},
    {"similarity"},
    {"scoring"},
    {"pruning"},
    {"reports"},
    {"studies"},
    {"api"},  # misbench.api and the package root that re-exports it
    {"cli"},  # misbench.cli (cli/) and misbench.__main__
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (cli/ is misbench.cli)."""
    out = {}
    for base, package in ((ROOT / "misbench", "misbench"), (ROOT / "cli", "misbench.cli")):
        for path in sorted(base.rglob("*.py")):
            parts = [package] + list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported misbench module, line) for every import statement, function-local ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "misbench"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "misbench":
                continue
            for alias in node.names:  # `from pkg import module` depends on the module
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return [(name, line) for name, line in found if name in MODULES or name == "misbench"]


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS and to docs/contributing.md"


def test_no_module_imports_upwards():
    upward = [f"{module} (line {line}) imports {target}"
              for module, targets in GRAPH.items() for target, line in targets
              if RANK[_unit(target)] > RANK[_unit(module)]]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules_or_subpackages():
    modules = {m: {t for t, _ in targets if t != m} for m, targets in GRAPH.items()}
    modules.pop("misbench", None)  # the root only re-exports misbench.api
    assert not _cycles(modules)
    units: dict[str, set[str]] = {}
    for module, targets in modules.items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert not _cycles(units)


def test_cycle_finder_finds_cycles():
    # the checks above are only as good as this
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _import_time_calls(tree: ast.Module):
    """Calls that run when the module is imported: everything outside function bodies."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def test_nothing_global_happens_at_import_time():
    forbidden = re.compile(r"^(matplotlib\.use|(torch|torch\.cuda|np\.random|numpy\.random|random)\.(manual_)?seed"
                           r"|torch\.use_deterministic_algorithms|torch\.set_\w+|logging\.basicConfig)$")
    found = []
    for module, path in MODULES.items():
        for call in _import_time_calls(ast.parse(path.read_text())):
            name = ast.unparse(call.func)
            if forbidden.match(name):
                found.append(f"{module}:{call.lineno} {name}()")
    assert not found


def test_function_local_imports_say_why():
    """A local import needs a comment on its line or on the line(s) of local imports just above it, or an
    `except ImportError` around it (an optional dependency)."""
    unexplained = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source)):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            optional = {id(n) for t in ast.walk(func) if isinstance(t, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type) for h in t.handlers)
                for n in t.body}  # an import guarded by `except ImportError` is an optional dependency
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in optional:
                    continue
                row = node.lineno - 1
                while row >= 0 and "#" not in lines[row]:
                    above = lines[row - 1].strip() if row else ""
                    if not (above.startswith(("import ", "from ", "#")) or above == ""):
                        break
                    if above.startswith("#"):
                        row -= 1
                        break
                    row -= 1
                    if above == "":
                        break
                if row < 0 or "#" not in lines[row]:
                    unexplained.append(f"{module}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not unexplained, "function-local imports without a comment saying why:\n" + "\n".join(unexplained)


def test_pyproject_lists_every_subpackage():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(misbench(?:\.\w+)*)"', re.search(r"^packages = \[(.*)\]$", text, re.M).group(1)))
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"} | {"misbench.configs"}  # data/
    assert packages == listed


def _options(command: click.Command, *path: str) -> dict[str, click.Parameter]:
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


def test_cli_choices_are_the_registries():
    from misbench.activations.tokens import TOKEN_REDUCTIONS
    from misbench.cli.main import cli
    from misbench.datasets.images import VIEWS
    from misbench.datasets.labels import LABEL_MODES
    from misbench.pruning.masks import CRITERIA, METHODS, SCHEDULES
    from misbench.reports.build import REPORTS
    from misbench.scoring.mis import SELECTIONS
    from misbench.scoring.settings import ENGINES
    from misbench.similarity import backend_names
    from misbench.similarity.index import DISTANCE_ENGINES

    def choices(*path, option):
        return list(_options(cli, *path)[option].type.choices)

    assert choices("prune", option="method") == list(METHODS) == ["unstructured", "structured", "connection"]
    assert choices("prune", option="criterion") == list(CRITERIA)
    assert choices("prune", option="schedule") == list(SCHEDULES)
    for command in ("extract", "prune", "eval"):
        assert choices(command, option="labels") == list(LABEL_MODES)
    assert choices("extract", option="token_reduction") == list(TOKEN_REDUCTIONS)
    assert choices("score", option="view") == list(VIEWS)
    assert choices("score", option="selection") == list(SELECTIONS)
    assert choices("score", option="engine") == list(ENGINES)
    assert choices("score", option="distances") == ["auto", *DISTANCE_ENGINES]
    assert _options(cli, "score")["similarity"].help == "|".join(backend_names())
    assert set(REPORTS) <= set(cli.commands["report"].commands)


def test_registries_take_a_new_entry_in_one_line(monkeypatch):
    """What docs/contributing.md promises: one registration makes a backend and a pruning method usable."""
    import torch
    from torch import nn

    from misbench.pruning import masks
    from misbench.similarity import base
    from misbench.similarity.pixel import PixelBackend

    monkeypatch.setattr(base, "BACKENDS", dict(base.BACKENDS))
    monkeypatch.setattr(base, "_HINTS", dict(base._HINTS))
    monkeypatch.setattr(base, "_SETTINGS", dict(base._SETTINGS))
    base.register_backend("grey:", hint="weight")(lambda spec, **kw: PixelBackend(**kw))
    assert "grey:<weight>" in base.backend_names()
    assert isinstance(base.build_backend("grey:0.5", image_size=16), PixelBackend)

    monkeypatch.setattr(masks, "METHODS", dict(masks.METHODS))
    seen = []

    @masks.register_method("first-conv", (nn.Conv2d,))
    def first_conv(model, layers, settings, keep, previous, score, generator):
        seen.append(sorted(layers))
        name = sorted(layers)[0]
        return {f"{name}.weight": torch.zeros_like(layers[name].weight, dtype=torch.bool)}

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2, 2))
    settings = masks.PruneSettings("first-conv", 0.5)
    result = masks.compute_masks(model, settings, 0.5, ())
    assert seen == [["0", "2"]] and list(result) == ["0.weight"] and settings.resolved_scope == "local"


def test_no_module_is_named_like_an_api_function():
    import misbench

    for name in misbench.__all__:
        assert not any(m.split(".")[1:2] == [name] for m in MODULES), f"misbench.{name} is a module and a function"
        assert not isinstance(getattr(misbench, name), type(misbench)), name


def test_every_registry_refuses_a_name_twice(monkeypatch):
    """A second registration under a taken name is an error naming the registry and the name, and the entry
    already there stays (torchvision's register_model): no plugin replaces a built-in by accident."""
    from torch import nn

    from misbench.activations import dictionary_kinds
    from misbench.errors import MisbenchError
    from misbench.models import archs, families
    from misbench.pruning import masks
    from misbench.reports import build
    from misbench.scoring import mis
    from misbench.similarity import base

    attempts = {
        "similarity backend 'pixel'": (base.BACKENDS, "pixel", lambda: base.register_backend("pixel")(object)),
        "pruning method 'structured'": (masks.METHODS, "structured",
                                        lambda: masks.register_method("structured", (nn.Conv2d,))(object)),
        "selection 'fair'": (mis.SELECTIONS, "fair", lambda: mis.register_selection("fair", len)(object)),
        "architecture 'tiny_cnn'": (archs._ARCHS, "tiny_cnn", lambda: archs.register_arch("tiny_cnn")(object)),
        "model family 'timm.'": (families.FAMILIES, "timm.", lambda: families.register_family(
            "timm.", families.Family("other", object, object, ""))),
        "report 'layers'": (build.REPORTS, "layers", lambda: build.register_report("layers", ())(object)),
        "dictionary kind 'topk'": (dictionary_kinds.KINDS, "topk",
                                   lambda: dictionary_kinds.register_kind("topk", object)),
    }
    for what, (registry, name, again) in attempts.items():
        before = registry[name]
        with pytest.raises(MisbenchError, match=f"^{what} is registered twice"):
            again()
        assert registry[name] is before, what
    assert build.REPORT_FILES["layers"] == ("layers.csv", "layers.png")


def test_a_model_family_is_one_registration(monkeypatch, tmp_path):
    """A prefix registered as a family is built, preprocessed and loaded (`name:random`; `name:WEIGHTS`
    refused with the family's reason) through misbench's model loading, with no other edit."""
    import torch

    from misbench.errors import MisbenchError
    from misbench.models import families
    from misbench.models.archs import TinyCNN, build_arch, check_arch, default_preprocess
    from misbench.models.loading import load_model
    from misbench.models.preprocess import Preprocess

    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    built = []

    def build(arch, num_classes, kwargs):
        built.append((arch, num_classes, kwargs))
        return TinyCNN(num_classes, width=int(arch.split(".")[1]))

    pre = Preprocess(40, 36, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    families.register_family("toy.", families.Family("toy", build, lambda arch: pre, "toy weights live nowhere"))
    check_arch("toy.4")
    assert default_preprocess("toy.4") == pre
    loaded = load_model("toy.4:random", num_classes=3)
    assert loaded.arch == "toy.4" and loaded.preprocess == pre and built[-1] == ("toy.4", 3, {})
    assert loaded.model.conv1.out_channels == 4 and loaded.model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)
    with pytest.raises(MisbenchError, match=r"toy models are built randomly initialised only \(toy.4:random; "
                                            r"toy weights live nowhere\)"):
        load_model("toy.4:DEFAULT")
    torch.save(build_arch("toy.4", 3).state_dict(), tmp_path / "w.pt")  # trained weights: a state_dict and --arch
    assert load_model(str(tmp_path / "w.pt"), arch="toy.4", num_classes=3).preprocess == pre


def test_a_report_is_one_registration(monkeypatch, tmp_path):
    """A function registered with its files is `misbench.report(kind)`, whose overwrite check covers the files."""
    import misbench
    from misbench.errors import MisbenchError
    from misbench.reports import build

    monkeypatch.setattr(build, "REPORTS", dict(build.REPORTS))
    monkeypatch.setattr(build, "REPORT_FILES", dict(build.REPORT_FILES))

    @build.register_report("count", files=("count.txt",))
    def count(words, out):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "count.txt").write_text(str(len(words)))
        return Path(out) / "count.txt"

    assert misbench.report("count", tmp_path / "r", words=["a", "b"]).read_text() == "2"
    with pytest.raises(MisbenchError, match="count.txt"):
        misbench.report("count", tmp_path / "r", words=["a"])
    assert misbench.report("count", tmp_path / "r", overwrite=True, words=["a"]).read_text() == "1"


def test_import_misbench_and_help_load_no_heavy_library():
    """`import misbench` and `misbench --help` stay light (PEP 562 face, lazily loaded commands): neither
    loads torch, scipy, pandas or matplotlib; the first use of an API name loads torch, and scipy and pandas
    wait for the first score or table (`misbench extract` and `prune` never load them)."""
    import subprocess
    import sys

    heavy = ("torch", "scipy", "pandas", "matplotlib", "torchvision", "h5py")
    code = ("import sys, misbench\nfrom misbench.cli.main import cli\n"
            "try:\n    cli.main(['--help'], prog_name='misbench')\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])\n"
            "misbench.score\nprint('AFTER', 'torch' in sys.modules, [m for m in ('scipy', 'pandas') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stdout and "AFTER True []" in run.stdout, run.stdout[-2000:]
    assert "score" in run.stdout and "Commands" in run.stdout  # the help did list the commands


def test_every_command_is_listed_and_loads():
    from misbench.cli.main import COMMANDS, cli, load_command

    for name in COMMANDS:
        command = load_command(name)
        assert command.name == name and cli.get_command(None, name) is command
    loaded = {c.name for module in {m for m, _ in COMMANDS.values()}
              for c in __import__(f"misbench.cli.{module}", fromlist=["COMMANDS"]).COMMANDS}
    assert loaded == set(COMMANDS)  # no command module holds a command the table misses
