"""The repository's top-level folders never shadow installed packages of the same name.

`export`, `runtime`, `kernels`, `calib` and `bench` are common names on PyPI (transformers 5
imports the `kernels` package). Installed, our folders are `rexedge.export`, ... only; run
from the repository root, neither this test process (README's `python -P -m pytest`) nor a
Python it starts may find them by their bare names.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("export", "runtime", "kernels", "calib", "bench")
LOCK = REPO / "requirements" / "dev.lock"

# Where each bare name resolves, as a JSON dict {name: [paths]}; run in this process and in a child.
WHERE = """
import importlib.util, json, sys
where = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    where[name] = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
print(json.dumps(where))
"""


def in_repo(path: str) -> bool:
    """True for a path inside the source tree (the installed copy lives in site-packages)."""
    if not path:
        return False
    resolved = Path(path).resolve()
    return resolved.is_relative_to(REPO) and ".venv" not in resolved.relative_to(REPO).parts


def resolve_names(cwd: Path | None = None) -> dict[str, list[str]]:
    """Where the bare top-level names resolve: in a child interpreter started from `cwd` (the way
    the tests start them, with the environment conftest sets), or in this process when cwd is None."""
    if cwd is None:
        found: dict[str, list[str]] = {}
        for name in TOP_LEVEL:
            spec = importlib.util.find_spec(name)
            found[name] = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
        return found
    done = subprocess.run([sys.executable, "-c", WHERE, *TOP_LEVEL], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


def test_repository_root_not_on_sys_path():
    on_path = [entry for entry in sys.path if Path(entry or ".").resolve() == REPO]
    assert not on_path, (f"the repository root is on sys.path ({on_path!r}): run the tests as README says, "
                         "`python -P -m pytest -q tests`, not `python -m pytest`")


@pytest.mark.parametrize("where", ["this process", "child from the repository root"])
def test_bare_names_do_not_resolve_to_our_folders(where: str):
    found = resolve_names(None if where == "this process" else REPO)
    shadowing = {name: paths for name, paths in found.items() if any(in_repo(p) for p in paths)}
    assert not shadowing, f"{where}: bare names resolve into the repository: {shadowing}"


def test_installed_distributions_of_those_names_import_from_site_packages():
    """Any installed distribution that provides one of the names (transformers pulls in `kernels`)
    imports its own files, not ours."""
    providers = importlib.metadata.packages_distributions()
    found = resolve_names(REPO)
    for name in TOP_LEVEL:
        if name not in providers:
            continue
        assert found[name], f"{name} (installed by {providers[name]}) cannot be found"
        assert not any(in_repo(p) for p in found[name]), f"{name} resolves to our folder: {found[name]}"


def test_rexedge_installs_nothing_at_the_top_level():
    tops = {line.split("/")[0] for line in
            (importlib.metadata.distribution("rexedge").read_text("top_level.txt") or "").split()}
    assert tops <= {"rexedge"}, f"rexedge installs top-level packages {tops}"


def test_lock_pins_every_requirement_of_the_test_environment():
    """requirements/dev.lock pins (==) whatever the dev install asks for: a requirement added to
    setup.py without refreshing the lock would be installed unpinned."""
    pinned = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not pinned with =="
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    wanted = set()
    for requirement in importlib.metadata.requires("rexedge") or []:
        name, _, marker = requirement.partition(";")
        if marker and "extra" in marker and '"dev"' not in marker:
            continue
        wanted.add(re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~\[]", name.strip())[0]).lower())
    missing = sorted(wanted - pinned.keys())
    assert not missing, f"{LOCK.name} lacks {missing}: run `bash requirements/refresh.sh`"
