"""Plumbing shared by the benchmark sections: clusters, timing, ansible-playbook, the scripted runbook.

Standard library and psycopg2 only. Everything the benchmarks create lives in the
work directory (default bench/.work/) and in the throwaway PostgreSQL 15 cluster
started there; the sandbox and real targets are never touched.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MIGRATIONS = ROOT / "files" / "migrations"
sys.path.insert(0, str(ROOT / "scripts"))

import pgcluster  # noqa: E402  (scripts/pgcluster.py, the project's one way to start PostgreSQL)

T0 = time.monotonic()


class BenchError(Exception):
    """A failure with a message for the reader of the benchmark output (no traceback needed)."""


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, pct: float):
    """Nearest-rank percentile (pct in 0..100) of a list of numbers; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(pct / 100.0 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


def tail(text: str, lines: int = 30) -> str:
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def human_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


def path_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Result:
    rc: int
    seconds: float
    out: str
    err: str
    cmd: list
    cpu_seconds: float | None = None  # user+sys of the command and every process it waited for

    def check(self, what: str) -> "Result":
        if self.rc != 0:
            raise BenchError(f"{what} failed (exit {self.rc}) after {self.seconds:.1f} s:\n"
                             f"{tail(self.out + chr(10) + self.err, 40)}")
        return self


def sh(cmd, *, env=None, timeout=None, cwd=ROOT, stdin: str | None = None) -> Result:
    """Run a command, capture its output, time it with a monotonic clock."""
    cmd = [str(c) for c in cmd]
    before = _children_cpu()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              input=stdin, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise BenchError(f"{os.path.basename(cmd[0])} timed out after {timeout} s:\n{tail(out)}") from exc
    return Result(proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr, cmd,
                  _children_cpu() - before)


def _children_cpu() -> float:
    """CPU seconds (user+sys) of every child process waited for so far. The benchmark runs one
    command at a time, so the difference around a command is that command's CPU (the server's
    own processes are not children: neither side of a comparison includes them). Unlike wall
    time, it barely moves with the machine's load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# PostgreSQL


class Cluster:
    """One throwaway PostgreSQL 15 cluster started by scripts/pgcluster.py on a free port."""

    def __init__(self, base: Path, archive: str | None = None, stanza: str = "bench"):
        self.base = Path(base).resolve()
        # A cluster left by an interrupted run is removed first: results must come from a fresh one.
        try:
            pgcluster.destroy(self.base)
            self.port = pgcluster.free_port()
            state = pgcluster.start(self.base, self.port, "postgres", archive=archive, stanza=stanza)
        except pgcluster.ClusterError as exc:
            raise BenchError(f"cannot start the benchmark cluster in {self.base}: {exc}") from exc
        self.bindir = Path(state["bindir"])
        self.home = Path(state["home"])
        self.state = state

    def url(self, db: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def bin(self, name: str) -> str:
        return str(self.bindir / name)

    def connect(self, db: str = "postgres", user: str = "postgres", autocommit: bool = True, **kw):
        conn = psycopg2.connect(self.url(db, user), application_name="ledger-bench", **kw)
        conn.autocommit = autocommit
        return conn

    def query(self, db: str, sql: str, params=None, user: str = "postgres"):
        conn = self.connect(db, user)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def execute(self, db: str, sql: str, params=None) -> None:
        self.query(db, sql, params)

    def exists(self, db: str) -> bool:
        return bool(self.query("postgres", "SELECT 1 FROM pg_database WHERE datname = %s", (db,)))

    def create_db(self, name: str, template: str | None = None) -> str:
        """A fresh database (dropped first if it exists); FILE_COPY makes a copy of a big template cheap."""
        self.drop_db(name)
        if template:
            self.execute("postgres", f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        else:
            self.execute("postgres", f'CREATE DATABASE "{name}"')
        return name

    def drop_db(self, name: str) -> None:
        self.execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def db_size(self, name: str) -> int:
        return self.query("postgres", "SELECT pg_database_size(%s)", (name,))[0][0]

    def version(self) -> str:
        return self.query("postgres", "SELECT version()")[0][0]

    def setting(self, name: str) -> str:
        return self.query("postgres", "SELECT current_setting(%s)", (name,))[0][0]

    def destroy(self) -> None:
        pgcluster.destroy(self.base)


def up_files(migrations_dir: Path, up_to: str | None = None) -> list[Path]:
    files = []
    for path in sorted(Path(migrations_dir).glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if path.name.endswith(".down.sql"):
            continue
        if up_to and path.name[:4] > up_to:
            break
        files.append(path)
    return files


def require_migrations(*versions: str) -> None:
    have = {p.name[:4] for p in up_files(MIGRATIONS)}
    missing = [v for v in versions if v not in have]
    if missing:
        raise BenchError(f"files/migrations has no up script for {', '.join(missing)} yet "
                         f"(found: {', '.join(sorted(have)) or 'none'})")


def apply_files(url: str, files, psql: str) -> None:
    """Apply migration files the runbook's way (psql -1 -f), without the pipeline."""
    for path in files:
        sh([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-d", url, "-f", path], timeout=600).check(
            f"psql -f {path.name}")


# --------------------------------------------------------------------------------------------
# The baseline: bench/runbook.sh


@dataclass
class ScriptRun:
    seconds: float
    steps: dict
    dump_bytes: int | None
    cpu_seconds: float | None = None


def run_runbook(cluster: Cluster, db: str, workdir: Path, migrations_dir: Path = MIGRATIONS,
                timeout: float = 3600) -> ScriptRun:
    backup_dir = workdir / f"script-{uuid.uuid4().hex[:8]}"
    backup_dir.mkdir(parents=True)
    env = clean_env()
    env["PATH"] = f"{cluster.bindir}:{env['PATH']}"
    try:
        res = sh(["bash", BENCH / "runbook.sh", cluster.url(db), migrations_dir, backup_dir], env=env,
                  timeout=timeout).check("bench/runbook.sh")
        steps, dump_bytes = {}, None
        for line in res.out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "step":
                steps[parts[1]] = steps.get(parts[1], 0.0) + int(parts[2]) / 1e6
            elif len(parts) == 3 and parts[0] == "dump":
                dump_bytes = int(parts[2])
        return ScriptRun(res.seconds, steps, dump_bytes, res.cpu_seconds)
    finally:
        shutil.rmtree(backup_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# ansible-playbook


def clean_env() -> dict:
    """The environment for every child: the venv first, the project's Ansible config, no stray target."""
    env = dict(os.environ)
    for key in list(env):
        # Never let a caller's DATABASE_URL or libpq settings point a benchmark at a real database.
        if key == "DATABASE_URL" or key.startswith("PG"):
            env.pop(key)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env.setdefault("ANSIBLE_HOME", str(ROOT / ".ansible"))
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ansible_playbook_bin() -> str:
    cand = Path(sys.executable).parent / "ansible-playbook"
    if cand.exists():
        return str(cand)
    found = shutil.which("ansible-playbook")
    if not found:
        raise BenchError("ansible-playbook not found: run 'make setup' (make bench does it)")
    return found


def write_inventory(path: Path, groups: dict) -> Path:
    """A user inventory whose hosts set only database_url: {group: {host: url}}. JSON is valid YAML."""
    inv = {group: {"hosts": {host: {"database_url": url} for host, url in hosts.items()}}
           for group, hosts in groups.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inv, indent=2) + "\n")
    return path


@dataclass
class PlaybookRun:
    rc: int
    seconds: float
    out: str
    tasks: list = field(default_factory=list)  # from the bench_timings callback
    started: float | None = None               # epoch seconds of the callback's start (task times are relative)
    plays: list = field(default_factory=list)  # one entry per play start (a serial play starts once per batch)
    profile: str = ""                          # profile_tasks' TASKS RECAP
    cpu_seconds: float | None = None           # user+sys of ansible-playbook, its workers and their commands

    def role_seconds(self, role: str, host: str | None = None) -> float:
        # The callback sees the role by its FQCN (arrakis.ledger.backup): compare the short name.
        return sum(t["seconds"] for t in self.tasks
                   if (t.get("role") or "").rsplit(".", 1)[-1] == role and (host is None or t["host"] == host))

    def task_at(self, epoch: float) -> str | None:
        """The task (and host) running at an absolute time, e.g. when a lock wait was seen."""
        if self.started is None:
            return None
        rel = epoch - self.started
        hits = [t for t in self.tasks if t["start"] <= rel <= t["end"]]
        return "; ".join(f"{t['task']} [{t['host']}]" for t in hits) or None

    def task_count(self, host: str | None = None) -> int:
        return sum(1 for t in self.tasks if (host is None or t["host"] == host) and t["status"] != "skipped")


class Ansible:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.bin = ansible_playbook_bin()

    def playbook(self, playbook: str, inventory: Path, limit: str, extra: dict | None = None, *,
                 timings: bool = True, profile: bool = False, timeout: float = 3600,
                 check: bool = True, what: str | None = None) -> PlaybookRun:
        """Run one playbook as an operator would; optionally with per-task timings (JSON) and profile_tasks."""
        pb = Path(playbook)
        if not pb.is_absolute():
            pb = ROOT / pb
        if not pb.exists():
            raise BenchError(f"{playbook} does not exist yet")
        env = clean_env()
        callbacks = []
        timings_file = None
        if timings:
            timings_file = self.workdir / f"timings-{uuid.uuid4().hex[:8]}.json"
            env["ANSIBLE_CALLBACK_PLUGINS"] = str(BENCH / "callback_plugins")
            env["BENCH_TIMINGS_FILE"] = str(timings_file)
            callbacks.append("bench_timings")
        if profile:
            callbacks.append("ansible.posix.profile_tasks")
            env["PROFILE_TASKS_SORT_ORDER"] = "none"
            env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "200"
            env["COLUMNS"] = "110"
        if callbacks:
            env["ANSIBLE_CALLBACKS_ENABLED"] = ",".join(callbacks)
        cmd = [self.bin, str(pb.relative_to(ROOT) if pb.is_relative_to(ROOT) else pb), "-i", str(inventory),
               "-l", limit]
        if extra:
            cmd += ["-e", json.dumps(extra)]
        res = sh(cmd, env=env, timeout=timeout)
        out = res.out + (("\n" + res.err) if res.err.strip() else "")
        pr = PlaybookRun(res.rc, res.seconds, out, cpu_seconds=res.cpu_seconds)
        if timings_file and timings_file.exists():
            try:
                data = json.loads(timings_file.read_text())
                pr.tasks, pr.started, pr.plays = data.get("tasks", []), data.get("started"), data.get("plays", [])
            finally:
                timings_file.unlink()
        if profile:
            pr.profile = extract_profile(res.out)
        if check and res.rc != 0:
            raise BenchError(f"{what or playbook} failed (exit {res.rc}) after {res.seconds:.1f} s:\n"
                             f"{failure_excerpt(out)}")
        return pr


def extract_profile(out: str) -> str:
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("TASKS RECAP"):
            body = [ln for ln in lines[i + 1:] if ln.strip() and not set(ln.strip()) <= set("=*")]
            return "\n".join(body)
    return ""


def failure_excerpt(out: str) -> str:
    """The failed task's lines and the recap, rather than the whole playbook output."""
    lines = out.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if line.startswith(("fatal:", "failed:")) or "FAILED!" in line or line.startswith("ERROR!") \
                or line.startswith("[ERROR]"):
            keep.extend(lines[max(0, i - 2):i + 25])
    recap = [i for i, ln in enumerate(lines) if ln.startswith("PLAY RECAP")]
    if recap:
        keep.extend(lines[recap[-1]:recap[-1] + 12])
    return "\n".join(keep) if keep else tail(out, 40)


def profile_table(tasks: list, host: str | None = None) -> str:
    """Per-task durations in execution order (one host), and the total per role."""
    rows = [t for t in tasks if host is None or t["host"] == host]
    if not rows:
        return "(no task timings recorded)"
    width = min(78, max(len(t["task"]) for t in rows) + 2)
    lines = [f"{t['task'][:width - 2]:<{width}} {t['status']:<8} {t['seconds']:7.2f} s" for t in rows]
    by_role: dict = {}
    for t in rows:
        key = t.get("role") or "(play)"
        by_role[key] = by_role.get(key, 0.0) + t["seconds"]
    lines.append("per role: " + ", ".join(f"{k} {v:.2f} s" for k, v in by_role.items()))
    ran = [t for t in rows if t["status"] != "skipped"]
    lines.append(f"tasks run: {len(ran)} (skipped: {len(rows) - len(ran)}), "
                 f"sum of task times {sum(t['seconds'] for t in rows):.2f} s")
    return "\n".join(lines)


def role_defaults(role: str) -> dict:
    """The role's defaults/main.yml (plain scalars only; templated values stay strings)."""
    path = ROOT / "roles" / role / "defaults" / "main.yml"
    if not path.exists():
        return {}
    try:
        import yaml  # ansible's dependency, always in the venv

        data = yaml.safe_load(path.read_text()) or {}
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - a default we can't read is simply unknown
        return {}


def role_options(role: str) -> dict:
    """meta/argument_specs.yml options of the role's main entry point ({} when absent)."""
    path = ROOT / "roles" / role / "meta" / "argument_specs.yml"
    if not path.exists():
        return {}
    try:
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        return ((data.get("argument_specs") or {}).get("main") or {}).get("options") or {}
    except Exception:  # noqa: BLE001
        return {}


def parse_duration(value, default: float) -> float:
    """'2s', '500ms', '1min', 2000 (ms, PostgreSQL's unit), '2' -> seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value) / 1000.0
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|min|m)?\s*", str(value))
    if not m:
        return default
    num = float(m.group(1))
    unit = m.group(2) or "ms"
    return num / 1000.0 if unit == "ms" else num * 60 if unit in ("min", "m") else num


def lock_timeout_seconds() -> tuple[float, str]:
    """The migrate role's lock timeout (default 2 s) and where the value came from."""
    defaults = role_defaults("migrate")
    for key, value in defaults.items():
        if "lock_timeout" in key and "{{" not in str(value):
            return parse_duration(value, 2.0), f"roles/migrate/defaults/main.yml {key}={value}"
    return 2.0, "default 2 s (roles/migrate/defaults has no *lock_timeout* yet)"


# --------------------------------------------------------------------------------------------
# The machine


def machine_info(cluster: Cluster | None) -> dict:
    info = {"nproc": os.cpu_count()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    try:
        info["os"] = next(line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                          if line.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        pass
    info["python"] = sys.version.split()[0]
    res = sh([ansible_playbook_bin(), "--version"], env=clean_env(), timeout=60)
    info["ansible"] = res.out.splitlines()[0] if res.rc == 0 and res.out else "?"
    if cluster is not None:
        info["postgresql"] = cluster.version()
        info["pg_settings"] = {k: cluster.setting(k) for k in
                               ("shared_buffers", "fsync", "synchronous_commit", "max_wal_size",
                                "maintenance_work_mem")}
    return info
