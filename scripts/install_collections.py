#!/usr/bin/env python3
"""Make the collections of requirements.yml available, with or without Galaxy.

Galaxy first (into .collections, which ansible.cfg searches first) when it is
reachable; otherwise the collections bundled in the pinned `ansible` package are
used, after checking that their versions satisfy requirements.yml. Fails only
when neither source has a satisfying version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from ansible.galaxy.dependency_resolution.versioning import meets_requirements

GALAXY_TIMEOUT = 30  # seconds; an unreachable Galaxy must not stall `make setup`


def installed_versions(search_path: list[Path]) -> dict[str, tuple[str, Path]]:
    found: dict[str, tuple[str, Path]] = {}
    for root in search_path:
        for manifest in sorted(root.glob("ansible_collections/*/*/MANIFEST.json")):
            info = json.loads(manifest.read_text())["collection_info"]
            name = f"{info['namespace']}.{info['name']}"
            found.setdefault(name, (info["version"], manifest.parent))
    return found


def main() -> int:
    req_file = Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.yml")
    dest = Path(sys.argv[2] if len(sys.argv) > 2 else ".collections")
    wanted = yaml.safe_load(req_file.read_text())["collections"]
    bundled_root = Path(__import__("ansible_collections").__path__[0]).parent

    def satisfied() -> list[str]:
        have = installed_versions([dest, bundled_root])
        missing = []
        for req in wanted:
            version, where = have.get(req["name"], (None, None))
            if version is None or not meets_requirements(version, req.get("version", "*")):
                missing.append(f"{req['name']} {req.get('version', '*')} (found {version or 'none'})")
            else:
                print(f"collections: {req['name']} {version} from {where}")
        return missing

    if not satisfied_in(dest, wanted):
        cmd = [str(Path(sys.executable).parent / "ansible-galaxy"), "collection", "install", "-r", str(req_file),
               "-p", str(dest), "--timeout", str(GALAXY_TIMEOUT)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=GALAXY_TIMEOUT * 3, check=False)
            ok = res.returncode == 0
            why = (res.stderr or res.stdout).strip().splitlines()[-1:] if not ok else []
        except subprocess.TimeoutExpired:
            ok, why = False, ["timed out"]
        if not ok:
            print(f"collections: Galaxy not reachable ({' '.join(why)[:160]}); using the collections bundled "
                  f"with the pinned ansible package")
    missing = satisfied()
    if missing:
        print("collections: no satisfying version of: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


def satisfied_in(dest: Path, wanted: list[dict]) -> bool:
    have = installed_versions([dest])
    return all(r["name"] in have and meets_requirements(have[r["name"]][0], r.get("version", "*")) for r in wanted)


if __name__ == "__main__":
    sys.exit(main())
