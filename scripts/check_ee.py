#!/usr/bin/env python3
"""Validate execution-environment.yml for ansible-builder 3 (run by `make lint`).

Three layers, each refusing with a message that names the key and what is wrong:

1. the version-3 schema of ansible-builder's definition file, written out here as a
   JSON schema (every key ansible-builder 3 accepts, with its type), plus the checks
   ansible-builder does beyond the schema (dependency files exist, the base image has
   a tag, additional_build_files destinations are relative);
2. this project's rules: the EE pins the same ansible-core and psycopg2 as
   requirements.txt, takes its collections from requirements.yml, installs the built
   arrakis.ledger artifact, and installs a PostgreSQL client;
3. ansible-builder's own code, when it is importable: `UserDefinition.validate()`
   and `ansible-builder create` (which writes the build context and Containerfile
   without any container engine) into a temporary directory. ansible-builder is not
   one of the project's pinned tools; `--fetch` downloads its wheel (no
   dependencies: it needs only PyYAML and jsonschema, which the venv has) into
   .cache/ansible-builder/ and imports it from there. Without it (offline), layers
   1 and 2 still run and the output says layer 3 was skipped.

    scripts/check_ee.py [--file execution-environment.yml] [--fetch] [--require-builder]
    scripts/check_ee.py --self-test    # show that each layer refuses broken definitions
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILDER_VERSION = "3.2.0"
# The wheel's sha256 on PyPI: --fetch refuses anything else (pip --require-hashes), and so
# does the import of a cached wheel.
BUILDER_SHA256 = "9cb948dbd221bdf6d0d48e80fa1575ca5f4336a569c05f510e2d406f01897673"
CACHE = ROOT / ".cache" / "ansible-builder"

STR_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
STR_OR_LIST_OR_DICT = {"anyOf": [{"type": "object"}, {"type": "string"},
                                 {"type": "array", "items": {"type": "string"}}]}


def _obj(properties, required=None):
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    return out


def _strings(*names):
    return {name: {"type": "string"} for name in names}


PIP_PACKAGE = _obj(_strings("package_pip"), required=["package_pip"])
IMAGE = {"type": "object", "properties": _strings("name", "signature_original_name")}
BUILD_STEPS = ["%s_%s" % (when, stage) for stage in ("base", "galaxy", "builder", "final")
               for when in ("prepend", "append")]

# ansible-builder 3's execution environment definition, version 3.
SCHEMA_V3 = _obj({
    "version": {"type": "number"},
    "build_arg_defaults": _obj(_strings("ANSIBLE_GALAXY_CLI_COLLECTION_OPTS", "ANSIBLE_GALAXY_CLI_ROLE_OPTS",
                                        "PKGMGR_PRESERVE_CACHE")),
    "dependencies": _obj({
        "python": STR_OR_LIST,
        "galaxy": STR_OR_LIST_OR_DICT,
        "system": STR_OR_LIST,
        "python_interpreter": _obj(_strings("package_system", "python_path")),
        "ansible_core": PIP_PACKAGE,
        "ansible_runner": PIP_PACKAGE,
        "exclude": _obj({key: {"type": "array", "items": {"type": "string"}}
                         for key in ("python", "system", "all_from_collections")}),
    }),
    "images": _obj({"base_image": IMAGE}),
    "additional_build_steps": _obj({step: STR_OR_LIST for step in BUILD_STEPS}),
    "additional_build_files": {"type": "array", "items": _obj(_strings("src", "dest"), required=["src", "dest"])},
    "options": _obj({
        "relax_passwd_permissions": {"type": "boolean"},
        "skip_ansible_check": {"type": "boolean"},
        "skip_pip_install": {"type": "boolean"},
        "workdir": {"type": ["string", "null"]},
        "package_manager_path": {"type": "string"},
        "user": {"type": "string"},
        "container_init": _obj(_strings("package_pip", "entrypoint", "cmd")),
        "tags": {"type": "array", "items": {"type": "string"}},
    }),
})


class EEError(Exception):
    pass


def load(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise EEError(f"cannot read {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        raise EEError(f"{path} is not valid YAML: {exc}")
    if not isinstance(data, dict):
        raise EEError(f"{path} must be a mapping, not {type(data).__name__}")
    return data


def check_schema(ee: dict, base: Path) -> list[str]:
    """Layer 1: the v3 schema and ansible-builder's checks beyond it."""
    version = ee.get("version", 1)
    if version != 3:
        return [f"version: must be 3 (ansible-builder 3's schema), found {version!r}"]
    errors = []
    validator = jsonschema.Draft7Validator(SCHEMA_V3)
    for err in sorted(validator.iter_errors(ee), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{where}: {err.message}")
    if errors:
        return errors
    deps = ee.get("dependencies", {})
    for key in ("python", "galaxy", "system"):
        for section, value in (("", deps.get(key)), ("exclude.", deps.get("exclude", {}).get(key))):
            if isinstance(value, str) and "\n" not in value:
                ref = Path(value) if os.path.isabs(value) else base / value
                if not ref.exists():
                    errors.append(f"dependencies.{section}{key}: file {value} does not exist (relative to {base})")
    image = ee.get("images", {}).get("base_image", {}).get("name")
    if image is not None:
        parts = image.split(":", 1)
        if len(parts) != 2 or not parts[1]:
            errors.append(f"images.base_image.name: {image} needs a tag (name:tag)")
    for i, entry in enumerate(ee.get("additional_build_files", [])):
        dest = Path(entry["dest"])
        if dest.is_absolute() or ".." in dest.parts:
            errors.append(f"additional_build_files.{i}.dest: must be relative without '..': {dest}")
    return errors


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def check_project(ee: dict, base: Path) -> list[str]:
    """Layer 2: the EE runs what requirements.txt and requirements.yml pin."""
    errors = []
    req = _pins((ROOT / "requirements.txt").read_text())
    deps = ee.get("dependencies", {})
    core = _pins(deps.get("ansible_core", {}).get("package_pip", ""))
    if core.get("ansible-core") != req.get("ansible-core"):
        errors.append(f"dependencies.ansible_core: must pin ansible-core=={req.get('ansible-core')} "
                      f"(requirements.txt), found {deps.get('ansible_core')}")
    python = deps.get("python")
    python_text = "\n".join(python) if isinstance(python, list) else (python or "")
    if isinstance(python, str) and "\n" not in python:
        python_text = (base / python).read_text() if (base / python).exists() else ""
    ee_pins = _pins(python_text)
    for name in ("psycopg2-binary",):
        if ee_pins.get(name) != req.get(name):
            errors.append(f"dependencies.python: must pin {name}=={req.get(name)} (requirements.txt), "
                          f"found {ee_pins.get(name)}")
    dev_tools = sorted(set(ee_pins) & {"ansible-lint", "molecule", "pytest", "pytest-testinfra", "yamllint", "squawk-cli"})
    if dev_tools:
        errors.append(f"dependencies.python: lint/test tools do not belong in the EE: {', '.join(dev_tools)}")
    galaxy = deps.get("galaxy")
    if not (isinstance(galaxy, str) and (base / galaxy).resolve() == (ROOT / "requirements.yml").resolve()):
        errors.append(f"dependencies.galaxy: must be this project's requirements.yml, found {galaxy!r}")
    files = [f.get("src", "") for f in ee.get("additional_build_files", []) if isinstance(f, dict)]
    final = "\n".join(ee.get("additional_build_steps", {}).get("append_final", []) or [])
    if "dist/arrakis-ledger-*.tar.gz" not in files or "ansible-galaxy collection install" not in final:
        errors.append("additional_build_files/append_final: the EE must install the built collection "
                      "(dist/arrakis-ledger-*.tar.gz from `make collection`) with ansible-galaxy collection install")
    system = deps.get("system")
    system_text = "\n".join(system) if isinstance(system, list) else (system or "")
    if not re.search(r"^\s*postgresql(-client)?\s*\[[^\]]*platform:rpm", system_text, re.M):
        errors.append("dependencies.system: needs the PostgreSQL client (pg_dump, pg_restore, psql) for "
                      "platform:rpm (ansible-builder installs with dnf)")
    return errors


def _import_builder(fetch: bool):
    """ansible_builder from the venv, else from a cached (or, with --fetch, downloaded) wheel."""
    try:
        import ansible_builder  # noqa: F401
        return "installed", None
    except ImportError:
        pass
    wheels = sorted(CACHE.glob(f"ansible_builder-{BUILDER_VERSION}-*.whl"))
    if not wheels and fetch:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
            req.write(f"ansible-builder=={BUILDER_VERSION} --hash=sha256:{BUILDER_SHA256}\n")
            req.flush()
            res = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                  "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", req.name,
                                  "-d", str(CACHE)], capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            return None, f"could not download ansible-builder {BUILDER_VERSION}: {res.stderr.strip()[-200:]}"
        wheels = sorted(CACHE.glob(f"ansible_builder-{BUILDER_VERSION}-*.whl"))
    if not wheels:
        return None, "ansible-builder is not installed and no wheel is cached (use --fetch)"
    if hashlib.sha256(wheels[-1].read_bytes()).hexdigest() != BUILDER_SHA256:
        return None, f"{wheels[-1]} does not have the expected sha256; delete it and use --fetch"
    sys.path.insert(0, str(wheels[-1]))
    try:
        import ansible_builder  # noqa: F401
    except ImportError as exc:
        return None, f"cannot import ansible-builder from {wheels[-1].name}: {exc}"
    return wheels[-1].name, None


def check_with_builder(path: Path) -> list[str]:
    """Layer 3: ansible-builder's own validation, then `ansible-builder create` without a container engine."""
    from ansible_builder.exceptions import DefinitionError
    from ansible_builder.user_definition import UserDefinition

    cwd = os.getcwd()
    try:
        os.chdir(path.parent)
        try:
            UserDefinition(path.name).validate()
        except DefinitionError as exc:
            return [f"ansible-builder: {exc}"]
        from ansible_builder.cli import run
        with tempfile.TemporaryDirectory(prefix="ee-context-") as ctx:
            argv = sys.argv
            sys.argv = ["ansible-builder", "create", "-f", path.name, "-c", ctx, "--output-filename", "Containerfile"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    run()
            except SystemExit as exc:
                if exc.code not in (0, None):
                    return [f"ansible-builder create failed: {out.getvalue().strip()[-500:]}"]
            finally:
                sys.argv = argv
            if not (Path(ctx) / "Containerfile").is_file():
                return [f"ansible-builder create wrote no Containerfile: {out.getvalue().strip()[-500:]}"]
    finally:
        os.chdir(cwd)
    return []


def check(path: Path, fetch: bool = False, require_builder: bool = False) -> tuple[list[str], str]:
    ee = load(path)
    base = path.parent
    errors = check_schema(ee, base)
    if not errors:
        errors += check_project(ee, base)
    if errors:
        return errors, "schema"
    source, why = _import_builder(fetch)
    if source is None:
        if require_builder:
            return [why], "builder"
        return [], f"schema and project rules (ansible-builder's own check skipped: {why})"
    errors = check_with_builder(path)
    return errors, f"schema, project rules and ansible-builder {source} (validate + create)"


def self_test(fetch: bool) -> int:
    """Each broken definition must be refused: a check that can't fail is no check."""
    good = load(ROOT / "execution-environment.yml")
    # (name, how to break it, whether ansible-builder itself refuses it too: our schema must agree)
    cases = [
        ("unknown top-level key", lambda d: d.update(dependenciez={}), True),
        ("version 2 key under v3", lambda d: d["images"].update(builder_image={"name": "x:1"}), True),
        ("wrong type", lambda d: d["options"].update(tags="latest"), True),
        ("ansible_core without package_pip", lambda d: d["dependencies"].update(ansible_core={}), True),
        ("missing galaxy file", lambda d: d["dependencies"].update(galaxy="no-such-requirements.yml"), True),
        ("base image without tag", lambda d: d["images"]["base_image"].update(name="quay.io/centos/centos"), True),
        ("absolute build file dest", lambda d: d.update(additional_build_files=[{"src": "x", "dest": "/etc"}]), True),
        ("ansible-core pin differs",
         lambda d: d["dependencies"].update(ansible_core={"package_pip": "ansible-core==2.18.0"}), False),
        ("psycopg2 missing", lambda d: d["dependencies"].update(python=["requests==2.32.0"]), False),
        ("no PostgreSQL client", lambda d: d["dependencies"].update(system=["git [platform:rpm]"]), False),
    ]
    builder, why = _import_builder(fetch)
    if builder is None:
        print(f"note: {why}; ansible-builder's agreement is not checked")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="ee-selftest-") as tmp:
        for name, breaker, builder_refuses in [("the project's definition", None, False)] + cases:
            ee = copy.deepcopy(good)
            # Written elsewhere: the galaxy file is named by its absolute path.
            ee["dependencies"]["galaxy"] = str(ROOT / "requirements.yml")
            if breaker:
                breaker(ee)
            path = Path(tmp) / "execution-environment.yml"
            path.write_text(yaml.safe_dump(ee, sort_keys=False))
            errors, _layers = check(path, fetch=fetch)
            ok = (not errors) if breaker is None else bool(errors)
            agree = ""
            if builder is not None:
                refused_by_builder = bool(check_with_builder(path))
                ok = ok and refused_by_builder == builder_refuses
                agree = "; ansible-builder %s" % ("refuses it too" if refused_by_builder else "accepts it")
            failures += not ok
            verdict = "accepted" if not errors else "refused: " + errors[0]
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {verdict}{agree}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=ROOT / "execution-environment.yml")
    parser.add_argument("--fetch", action="store_true",
                        help=f"download the ansible-builder {BUILDER_VERSION} wheel into .cache/ when not installed")
    parser.add_argument("--require-builder", action="store_true", help="fail when ansible-builder is unavailable")
    parser.add_argument("--self-test", action="store_true", help="show that broken definitions are refused")
    args = parser.parse_args(argv)
    try:
        if args.self_test:
            return self_test(args.fetch)
        errors, layers = check(args.file.resolve(), args.fetch, args.require_builder)
    except EEError as exc:
        print(f"check_ee: {exc}", file=sys.stderr)
        return 1
    if errors:
        print(f"check_ee: {args.file} is not a valid ansible-builder 3 definition:", file=sys.stderr)
        for err in errors:
            print(f"  - {err}", file=sys.stderr)
        return 1
    print(f"check_ee: {args.file.name} is valid ({layers})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
