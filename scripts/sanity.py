#!/usr/bin/env python3
"""`ansible-test sanity` on the collection as it ships (called by `make lint`).

ansible-test wants the collection under a path ending in ansible_collections/<ns>/<name>
(a real directory: it resolves symlinks) and tests exactly what is there. So this script
builds the artifact (`ansible-galaxy collection build`, the same tarball another team
installs), unpacks it under .cache/sanity/ansible_collections/arrakis/ledger, adds
tests/sanity if it exists (ignore files: none are needed today) and runs
`ansible-test sanity` there with the venv's Python.

pip for ansible-test's per-test virtualenvs: ansible-test bootstraps pip in each new
virtualenv with a get-pip script it downloads from ci-files.testing.ansible.com, a host
this machine cannot reach. ansible-test first looks for that script in its cache
(~/.ansible/test/cache/get_pip_<version>.py); this script puts its own there, which does
the same job from what is reachable: pip from Python's bundled `ensurepip`, then the
exact pip version ansible-test asked for from the package registry (PyPI). HOME points at
~/.cache/arrakis-ledger/ansible-test-home (a cache of ansible-test's own: nothing else of
the user's home is touched). Nothing is faked: the sanity tests run with the requirements
ansible-test pins, installed by pip.

Sanity tests skipped here, and why, are listed in SKIPPED (and in the README).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "sanity"
COLLECTION = WORK / "ansible_collections" / "arrakis" / "ledger"
# ansible-test keeps its per-test virtualenvs under $HOME/.ansible/test: a home of its own, outside the
# checkout, so that a fresh clone on the same machine reuses them (the first run builds them: ~4 min).
HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arrakis-ledger" / "ansible-test-home"
BIN = Path(sys.executable).parent

# Tests that cannot run on this machine, with the reason (kept short; see README "Tests").
SKIPPED = {
    "pslint": "needs PowerShell (pwsh), which is not installed; the collection has no PowerShell code",
}

GET_PIP = '''"""get-pip replacement for ansible-test (written by scripts/sanity.py): pip from ensurepip, then PyPI.

Called as get-pip.py is: its arguments are `pip install` arguments plus get-pip's own
--no-setuptools / --no-wheel (do not install those).
"""
import subprocess
import sys

args = sys.argv[1:]
own = {"--no-setuptools", "--no-wheel"}
subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
subprocess.check_call([sys.executable, "-m", "pip", "install"] + [a for a in args if a not in own])
if "--no-setuptools" in args:  # ensurepip brings setuptools along on Python < 3.12
    subprocess.call([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"])
'''


def pip_versions():
    """The pip version(s) ansible-test bootstraps (its requirements' pins)."""
    import ansible_test

    data = Path(ansible_test.__file__).parent / "_data" / "requirements"
    versions = set()
    for path in data.glob("*.txt"):
        for line in path.read_text().splitlines():
            if line.startswith("pip =="):
                versions.add(line.split("==", 1)[1].split(";")[0].strip())
    return versions or {"24.2"}


def build():
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(dist),
                    "--force"], check=True, stdout=subprocess.DEVNULL)
    (artifact,) = dist.glob("arrakis-ledger-*.tar.gz")
    shutil.rmtree(COLLECTION, ignore_errors=True)
    COLLECTION.mkdir(parents=True)
    with tarfile.open(artifact) as tar:
        tar.extractall(COLLECTION, filter="data")
    if (ROOT / "tests" / "sanity").is_dir():  # ignore files, if there ever are any (there are none today)
        shutil.copytree(ROOT / "tests" / "sanity", COLLECTION / "tests" / "sanity")
    # ansible-test lists its targets with git; under this checkout it would ask the checkout's git,
    # which ignores .cache/. A repository of its own makes exactly the artifact's files the targets.
    subprocess.run(["git", "init", "-q"], cwd=COLLECTION, check=True)
    subprocess.run(["git", "add", "-A"], cwd=COLLECTION, check=True)


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    build()
    cache = HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for version in pip_versions():
        (cache / ("get_pip_%s.py" % version.replace(".", "_"))).write_text(GET_PIP)
    env = dict(os.environ, HOME=str(HOME), ANSIBLE_HOME=str(HOME / ".ansible"))
    env.pop("ANSIBLE_CONFIG", None)  # the project's ansible.cfg is not the collection's
    cmd = [str(BIN / "ansible-test"), "sanity", "--python", "%d.%d" % sys.version_info[:2], "--color", "no"]
    for test in SKIPPED:
        cmd += ["--skip-test", test]
    cmd += sys.argv[1:]
    print("sanity: %s (in %s)" % (" ".join(cmd[1:]), COLLECTION), flush=True)
    return subprocess.run(cmd, cwd=COLLECTION, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
