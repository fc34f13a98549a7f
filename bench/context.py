"""The state one benchmark run shares between sections: the cluster, the runner, the results."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import datagen
from lib import Ansible, Cluster, PlaybookRun, human_bytes, log, write_inventory


@dataclass
class Row:
    section: str
    metric: str
    value: float | None
    unit: str = ""
    goal: str = ""
    met: bool | None = None

    def shown(self) -> str:
        v = self.value
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        if self.unit == "B":
            return human_bytes(v)
        if self.unit == "x":
            return f"{v:.3f}x" if v < 2 else f"{v:.2f}x"
        if self.unit == "s":
            return f"{v:.2f} s"
        if self.unit == "ms":
            return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"
        if isinstance(v, float):
            return f"{v:,.1f} {self.unit}".strip()
        return f"{v:,} {self.unit}".strip()

    def as_dict(self) -> dict:
        return {"section": self.section, "metric": self.metric, "value": self.value, "unit": self.unit,
                "shown": self.shown(), "goal": self.goal, "met": self.met}


@dataclass
class SectionResult:
    name: str
    status: str = "not run"
    error: str = ""
    seconds: float = 0.0
    rows: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def row(self, metric: str, value, unit: str = "", goal: str = "", met: bool | None = None) -> Row:
        r = Row(self.name, metric, value, unit, goal, met)
        self.rows.append(r)
        return r

    def as_dict(self) -> dict:
        return {"status": self.status, "error": self.error, "seconds": round(self.seconds, 1),
                "rows": [r.as_dict() for r in self.rows], "details": self.details}


class Context:
    def __init__(self, args, workdir: Path, cluster: Cluster):
        self.args = args
        self.workdir = workdir
        self.cluster = cluster
        self.ansible = Ansible(workdir)
        self.templates: dict = {}  # size in GB -> (database name, generation info)

    # -- databases -------------------------------------------------------------------------
    def sized_template(self, gb: float) -> tuple[str, dict]:
        """A database holding `gb` GB of pre-existing data (made once per run, copied per measurement)."""
        if gb in self.templates:
            return self.templates[gb]
        name = f"bench_data_{str(gb).replace('.', '_')}"
        self.cluster.create_db(name)
        if gb > 0:
            log(f"generating {gb} GB of pre-existing data in {name} (server-side generate_series)")
            info = datagen.generate(self.cluster, name, gb)
            log(f"  {human_bytes(info['bytes'])} in {info['tables']} tables in {info['seconds']:.1f} s")
        else:
            info = {"requested_gb": 0, "bytes": self.cluster.db_size(name), "tables": 0, "seconds": 0.0}
        self.templates[gb] = (name, info)
        return self.templates[gb]

    def fresh_copy(self, template: str, name: str) -> str:
        return self.cluster.create_db(name, template=template)

    # -- the pipeline ----------------------------------------------------------------------
    def run_dir(self, label: str) -> Path:
        path = self.workdir / "runs" / f"{label}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def pipeline(self, playbook: str, targets: dict, limit: str | None = None, extra: dict | None = None,
                 run_dir: Path | None = None, keep: bool = False, group: str = "bench", **kw) -> PlaybookRun:
        """Run a playbook against {host: database} through a user inventory (hosts set only database_url).

        Backups and reports go to a run directory under the work directory (removed afterwards
        unless keep=True), never to the project's backups/ or reports/.
        """
        own_dir = run_dir is None
        run_dir = run_dir or self.run_dir(Path(playbook).stem)
        inventory = write_inventory(run_dir / "inventory.yml",
                                    {group: {h: self.cluster.url(db) for h, db in targets.items()}})
        variables = {"backup_dir": str(run_dir / "backups"), "report_dir": str(run_dir / "reports")}
        variables.update(extra or {})
        try:
            return self.ansible.playbook(playbook, inventory, limit or group, variables, **kw)
        finally:
            if own_dir and not keep:
                shutil.rmtree(run_dir, ignore_errors=True)
