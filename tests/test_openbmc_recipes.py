"""The bitbake recipes in contrib/openbmc/ against the project they package.

No bitbake here: the recipes are read with a small parser for the plain
assignments they use, and checked against pyproject.toml (dependencies and
their bounds), against what the daemon really imports (its module graph,
walked from ``hiomapbridge.cli``), against hiomapbridge's version and
against contrib/ (every deployment file is installed, into the package of
its mode).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import hiomapbridge

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
LAYER = CONTRIB / "openbmc"
PACKAGE_DIR = ROOT / "hiomapbridge"

# -- recipe parsing -------------------------------------------------------------

_ASSIGN = re.compile(
    r'^(?P<var>[A-Za-z0-9_\-${}:.\[\]/]+)\s*(?P<op>\?\?=|\?=|\+=|=\+|\.=|=)\s*"(?P<value>.*)"$'
)


def parse_recipe(path: Path) -> dict[str, str]:
    """{variable: value} for a recipe's plain assignments (=, ?=, ??=, +=,
    .=); shell and python functions are skipped; line continuations joined."""
    text = path.read_text().replace("\\\n", " ")
    values: dict[str, str] = {}
    in_function = False
    for raw in text.splitlines():
        line = raw.strip()
        if in_function:
            in_function = line != "}"
            continue
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            in_function = True
            continue
        if line.startswith(("inherit ", "require ", "include ", "addtask ")):
            continue
        match = _ASSIGN.match(line)
        assert match, f"{path.name}: cannot parse {line!r}"
        var, op, value = match["var"], match["op"], match["value"]
        old = values.get(var)
        if op == "=" or (op in ("?=", "??=") and old is None):
            values[var] = value
        elif op == "+=":
            values[var] = f"{old or ''} {value}"
        elif op == ".=":
            values[var] = f"{old or ''}{value}"
    return values


def tokens(recipe: dict[str, str], var: str) -> list[str]:
    return recipe.get(var, "").split()


def inherits(path: Path) -> set[str]:
    return {
        cls
        for line in path.read_text().splitlines()
        if line.startswith("inherit ")
        for cls in line.split()[1:]
    }


def recipe_path(pattern: str) -> Path:
    (path,) = sorted(LAYER.glob(pattern))
    return path


def recipe_version(path: Path) -> str:
    _, _, version = path.stem.partition("_")
    assert version, f"{path.name}: no version in the file name"
    return version


HIOMAPBRIDGE_BB = recipe_path("recipes-*/hiomapbridge/hiomapbridge_*.bb")
JEEPNEY_BB = recipe_path("recipes-*/python/python3-jeepney_*.bb")


def hiomapbridge_recipe() -> dict[str, str]:
    return parse_recipe(HIOMAPBRIDGE_BB)


def test_parser_reads_continuations_and_skips_functions(tmp_path: Path) -> None:
    recipe = tmp_path / "x_1.0.bb"
    recipe.write_text(
        'A = "one \\\n    two"\nA += "three"\nB ?= "b"\nB ?= "c"\n'
        'do_install:append() {\n    X = "not a variable"\n}\nC .= "c"\n'
    )
    assert parse_recipe(recipe) == {"A": "one      two three", "B": "b", "C": "c"}
    assert tokens(parse_recipe(recipe), "A") == ["one", "two", "three"]
    recipe.write_text('A = "unterminated\n')
    with pytest.raises(AssertionError, match="cannot parse"):
        parse_recipe(recipe)


# -- what the daemon imports ------------------------------------------------------

# The standard-library modules, by the openembedded-core python3 package
# that ships them (python3-manifest.json, as read in openbmc/openbmc's
# poky/meta/recipes-devtools/python/python3/). Built-in modules (errno, sys,
# itertools, ...) and lib-dynload/array, select, math are in python3-core.
OE_PYTHON3_PACKAGE = {
    **dict.fromkeys(
        (
            "__future__ abc argparse array ast binascii bisect codecs collections "
            "contextlib copy copyreg dis enum errno functools gc genericpath "
            "heapq importlib inspect io itertools keyword linecache locale math "
            "operator os platform posix posixpath pwd re reprlib select "
            "selectors signal stat struct subprocess sys textwrap threading "
            "time token tokenize traceback types warnings weakref"
        ).split(),
        "python3-core",
    ),
    "asyncio": "python3-asyncio",
    "concurrent": "python3-asyncio",
    "datetime": "python3-datetime",
    "fcntl": "python3-fcntl",
    "hashlib": "python3-crypt",
    "ipaddress": "python3-io",
    "json": "python3-json",
    "logging": "python3-logging",
    "mmap": "python3-mmap",
    "queue": "python3-threading",
    "random": "python3-math",
    "shutil": "python3-shell",
    "socket": "python3-io",
    "ssl": "python3-io",
    "string": "python3-stringold",
    "tempfile": "python3-io",
    "typing": "python3-typing",
    "xml": "python3-xml",
}


def module_file(root: Path, package: str, module: str) -> Path | None:
    """The source file of ``module`` (dotted, inside ``package`` at
    ``root``), or None when it is not one of the package's modules."""
    if module != package and not module.startswith(package + "."):
        return None
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_graph(
    root: Path, package: str, start: Iterable[str]
) -> tuple[set[str], set[str]]:
    """Walk the imports from the ``start`` modules of ``package`` through
    the package's own modules: (the package's modules reached, the top-level
    names of everything else they import)."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = module_file(root, package, module)
        assert path is not None, module
        seen.add(module)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    assert node.module is not None
                    prefix = node.module
                targets = [prefix]
                # "from pkg import submodule" imports the submodule too
                targets += [f"{prefix}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] == package:
                    if module_file(root, package, target) is not None:
                        todo.append(target)
                else:
                    outside.add(target.split(".")[0])
    return seen, outside


def daemon_imports() -> tuple[set[str], set[str]]:
    """(stdlib, third-party) top-level modules the daemon's code imports."""
    _, outside = import_graph(PACKAGE_DIR, "hiomapbridge", ["hiomapbridge.cli"])
    stdlib = {name for name in outside if name in sys.stdlib_module_names}
    return stdlib, outside - stdlib


def test_import_graph_follows_relative_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .sub import c\nimport json\n")
    (pkg / "b.py").write_text("import socket\nfrom collections.abc import Callable\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("from ..b import y\nimport trio\nx = 1\n")
    (pkg / "unused.py").write_text("import mmap\n")
    seen, outside = import_graph(pkg, "pkg", ["pkg.a"])
    assert seen == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    assert outside == {"json", "socket", "collections", "trio"}


def test_the_daemon_does_not_load_the_bench() -> None:
    """The recipe drops the bench's commands; the daemon must not need
    hiomapbridge.sim or the demo."""
    seen, _ = import_graph(PACKAGE_DIR, "hiomapbridge", ["hiomapbridge.cli"])
    assert "hiomapbridge.cli" in seen and "hiomapbridge.dbus" in seen
    assert not any(m.startswith("hiomapbridge.sim") for m in seen), seen
    assert "hiomapbridge.demo" not in seen


# -- hiomapbridge's recipe against pyproject.toml and the code --------------------


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def runtime_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return [Requirement(text) for text in project["dependencies"]]


def oe_name(requirement: Requirement) -> str:
    """meta-python / openembedded-core name a PyPI distribution."""
    return f"python3-{canonicalize_name(requirement.name)}"


def stdlib_packages(modules: Iterable[str]) -> set[str]:
    unknown = sorted(set(modules) - OE_PYTHON3_PACKAGE.keys())
    assert not unknown, (
        f"standard-library modules {unknown} are imported but not mapped to "
        "their openembedded-core python3-* package: add them to "
        "OE_PYTHON3_PACKAGE (python3-manifest.json) and to the recipe's RDEPENDS"
    )
    return {OE_PYTHON3_PACKAGE[name] for name in modules}


def test_rdepends_are_pyproject_dependencies_plus_stdlib_pieces() -> None:
    rdepends = tokens(hiomapbridge_recipe(), "RDEPENDS:${PN}")
    assert len(rdepends) == len(set(rdepends)), f"duplicates in {rdepends}"
    third_party = [oe_name(req) for req in runtime_requirements()]
    assert len(set(third_party)) == len(third_party)
    stdlib, _ = daemon_imports()
    expected = set(third_party) | stdlib_packages(stdlib)
    assert "python3-core" in expected
    missing = expected - set(rdepends)
    extra = set(rdepends) - expected
    assert not missing and not extra, f"missing {missing}, not needed {extra}"


def test_every_third_party_import_is_a_declared_dependency() -> None:
    _, third_party = daemon_imports()
    declared = {canonicalize_name(req.name) for req in runtime_requirements()}
    assert {canonicalize_name(name) for name in third_party} == declared


def test_rdepends_check_can_fail() -> None:
    """An import the table does not know, or a dependency the recipe lacks,
    is reported (the checks above are not vacuous)."""
    with pytest.raises(AssertionError, match="not mapped"):
        stdlib_packages({"tkinter"})
    assert oe_name(Requirement("Jeepney>=0.8")) == "python3-jeepney"
    assert oe_name(Requirement("sortedcontainers")) == "python3-sortedcontainers"


def test_recipe_version_is_the_package_version() -> None:
    assert recipe_version(HIOMAPBRIDGE_BB) == hiomapbridge.__version__


def test_recipe_builds_with_pyprojects_backend() -> None:
    backend = pyproject()["build-system"]
    assert isinstance(backend, dict)
    assert backend["build-backend"] == "hatchling.build"
    assert {"python_hatchling", "systemd", "useradd"} <= inherits(HIOMAPBRIDGE_BB)
    assert hiomapbridge_recipe()["SRC_URI"] == "file://hiomapbridge-${PV}.tar.gz"


# -- hiomapbridge's recipe against contrib/ ----------------------------------------

_INSTALL = re.compile(r"install -m 0644 \$\{S\}/(?P<src>\S+) \$\{D\}(?P<dest>\S+)/")

# Where each contrib file goes, by package (README "Deployment").
BT_FILES = {
    "contrib/bt/hiomapbridge-bt.service": "${systemd_system_unitdir}",
    "contrib/bt/mboxd.service.d/hiomapbridge-bt.conf": (
        "${systemd_system_unitdir}/mboxd.service.d"
    ),
    "contrib/bt/dbus-1/system.d/hiomapbridge-bt.conf": "${datadir}/dbus-1/system.d",
    "contrib/bt/udev/rules.d/70-hiomapbridge-bt.rules": (
        "${nonarch_base_libdir}/udev/rules.d"
    ),
}
BTBRIDGED_FILES = {
    "contrib/hiomapbridge.service": "${systemd_system_unitdir}",
    "contrib/mboxd.service.d/hiomapbridge.conf": (
        "${systemd_system_unitdir}/mboxd.service.d"
    ),
    "contrib/dbus-1/system.d/hiomapbridge.conf": "${datadir}/dbus-1/system.d",
}
# contrib/sysusers.d: OpenBMC images create the user with useradd (below).
NOT_INSTALLED = {"contrib/sysusers.d/hiomapbridge.conf"}


def installs() -> dict[str, str]:
    return {m["src"]: m["dest"] for m in _INSTALL.finditer(HIOMAPBRIDGE_BB.read_text())}


def test_recipe_installs_every_deployment_file() -> None:
    shipped = {
        str(path.relative_to(ROOT))
        for path in CONTRIB.rglob("*")
        if path.is_file() and LAYER not in path.parents
    }
    assert installs() == BT_FILES | BTBRIDGED_FILES
    assert shipped == BT_FILES.keys() | BTBRIDGED_FILES.keys() | NOT_INSTALLED


@pytest.mark.parametrize(
    ("package", "files"),
    [("${PN}-bt", BT_FILES), ("${PN}-btbridged", BTBRIDGED_FILES)],
    ids=["bt", "btbridged"],
)
def test_each_mode_package_holds_its_files(package: str, files: dict[str, str]) -> None:
    packaged = set(tokens(hiomapbridge_recipe(), f"FILES:{package}"))
    assert packaged == {f"{dest}/{Path(src).name}" for src, dest in files.items()}
    units = [Path(src).name for src in files if src.endswith(".service")]
    assert tokens(hiomapbridge_recipe(), f"SYSTEMD_SERVICE:{package}") == units


def test_mode_packages_conflict_and_pull_in_the_daemon() -> None:
    recipe = hiomapbridge_recipe()
    assert tokens(recipe, "PACKAGE_BEFORE_PN") == ["${PN}-bt", "${PN}-btbridged"]
    assert tokens(recipe, "SYSTEMD_PACKAGES") == ["${PN}-bt", "${PN}-btbridged"]
    assert "${PN}-btbridged" in tokens(recipe, "RCONFLICTS:${PN}-bt")
    # bt: mode takes btbridged's place on the device and the bus name
    assert "phosphor-ipmi-bt" in tokens(recipe, "RCONFLICTS:${PN}-bt")
    assert tokens(recipe, "RCONFLICTS:${PN}-btbridged") == ["${PN}-bt"]
    for package in ("${PN}-bt", "${PN}-btbridged"):
        assert tokens(recipe, f"RDEPENDS:{package}") == ["${PN}"]


def test_recipe_creates_the_units_user() -> None:
    recipe = hiomapbridge_recipe()
    users = {
        line.split("=", 1)[1].strip()
        for unit in ("hiomapbridge.service", "bt/hiomapbridge-bt.service")
        for line in (CONTRIB / unit).read_text().splitlines()
        if line.startswith(("User=", "Group="))
    }
    assert len(users) == 1
    (user,) = users
    assert tokens(recipe, "USERADD_PACKAGES") == ["${PN}"]
    params = tokens(recipe, "USERADD_PARAM:${PN}")
    assert params[-1] == user
    assert {"--system", "--user-group"} <= set(params)


def test_recipe_drops_the_bench_commands() -> None:
    scripts = pyproject()["project"]
    assert isinstance(scripts, dict)
    commands = set(scripts["scripts"])
    assert commands == {"hiomapbridge", "hiomapbridge-sim", "hiomapbridge-demo"}
    text = HIOMAPBRIDGE_BB.read_text()
    for command in commands - {"hiomapbridge"}:
        assert f"${{D}}${{bindir}}/{command}" in text


# -- python3-jeepney ------------------------------------------------------------------


def jeepney_requirement() -> Requirement:
    (req,) = [r for r in runtime_requirements() if r.name == "jeepney"]
    return req


def test_jeepney_recipe_satisfies_pyprojects_bound() -> None:
    version = Version(recipe_version(JEEPNEY_BB))
    assert jeepney_requirement().specifier.contains(version), (
        f"python3-jeepney {version} does not satisfy {jeepney_requirement()}"
    )
    assert {"pypi", "python_flit_core"} <= inherits(JEEPNEY_BB)


def test_jeepney_bound_check_can_fail() -> None:
    assert not jeepney_requirement().specifier.contains(Version("0.7.1"))


def installed_jeepney_matches_recipe() -> bool:
    return importlib.metadata.version("jeepney") == recipe_version(JEEPNEY_BB)


needs_recipes_jeepney = pytest.mark.skipif(
    not installed_jeepney_matches_recipe(),
    reason="the installed jeepney is not the recipe's version",
)


@needs_recipes_jeepney
def test_jeepney_license_checksum() -> None:
    dist = importlib.metadata.distribution("jeepney")
    licenses = [f for f in dist.files or () if f.name == "LICENSE"]
    assert len(licenses) == 1, licenses
    md5 = hashlib.md5(Path(str(dist.locate_file(licenses[0]))).read_bytes())
    expected = re.search(
        r"md5=([0-9a-f]{32})", parse_recipe(JEEPNEY_BB)["LIC_FILES_CHKSUM"]
    )
    assert expected is not None
    assert md5.hexdigest() == expected[1]


@needs_recipes_jeepney
def test_jeepney_rdepends_cover_what_the_daemon_uses() -> None:
    """The stdlib pieces of the jeepney modules the daemon imports (and
    what they import), plus python3-core."""
    import jeepney

    root = Path(jeepney.__file__).parent
    used = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        if "sim" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "jeepney"
            ):
                used.add(node.module or "")
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("jeepney")}
    assert "jeepney.io.trio" in used
    _, outside = import_graph(root, "jeepney", used)
    stdlib = {name for name in outside if name in sys.stdlib_module_names}
    # jeepney.io.trio's trio and outcome come with python3-trio (an extra).
    assert outside - stdlib == {"trio", "outcome"}
    rdepends = tokens(parse_recipe(JEEPNEY_BB), "RDEPENDS:${PN}")
    assert set(rdepends) == stdlib_packages(stdlib), rdepends
