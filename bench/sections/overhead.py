"""1. overhead: the whole pipeline against the runbook as a plain script, on an empty database.

Alternating runs (pipeline, four stage tasks, script, then script, four stage tasks, pipeline,
...), a fresh database for each, medians and their ratio (goal <= 4). Also the floor under any
playbook (ansible-playbook on an empty play, and the cost of one module task), the floor
under any pipeline of this project (the four stage modules as four bare tasks: no roles, so
no argument validation, guards or promotion), and the per-task profile of one pipeline run
(ansible.posix.profile_tasks plus the bench_timings callback).
"""

from __future__ import annotations

import os

from lib import MIGRATIONS, log, median, profile_table, run_runbook

GOAL_RATIO = 4.0

EMPTY_PLAY = """---
- name: Startup floor (no tasks)
  hosts: all
  gather_facts: false
  connection: local
  tasks: []
"""

PING_PLAY = """---
- name: Cost of module tasks (10 x ping)
  hosts: all
  gather_facts: false
  connection: local
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
""" + "".join(f"    - name: Ping {i}\n      ansible.builtin.ping:\n" for i in range(10))

# The least any playbook of this project can be: the four stages' modules as four tasks, no
# roles (so no argument validation, guards, shows or promotion), the same work in each.
STAGES_PLAY = f"""---
- name: The four stages as four module tasks (no roles)
  hosts: all
  gather_facts: false
  connection: local
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
  tasks:
    - name: Precheck
      arrakis.ledger.ledger_precheck:
        database_url: "{{{{ database_url }}}}"
        migrations_dir: "{MIGRATIONS}"
        run_id: bench-stages
    - name: Backup
      arrakis.ledger.ledger_backup:
        database_url: "{{{{ database_url }}}}"
        backup_dir: "{{{{ backup_dir }}}}"
        run_id: bench-stages
    - name: Migrate
      arrakis.ledger.ledger_migrate:
        database_url: "{{{{ database_url }}}}"
        migrations_dir: "{MIGRATIONS}"
        run_id: bench-stages
    - name: Verify
      arrakis.ledger.ledger_verify:
        database_url: "{{{{ database_url }}}}"
        migrations_dir: "{MIGRATIONS}"
        run_id: bench-stages
"""


def run(ctx, res):
    cl, runs = ctx.cluster, ctx.args.runs
    floor_dir = ctx.workdir / "floor"
    floor_dir.mkdir(parents=True, exist_ok=True)
    (floor_dir / "empty.yml").write_text(EMPTY_PLAY)
    (floor_dir / "ping10.yml").write_text(PING_PLAY)
    (floor_dir / "stages.yml").write_text(STAGES_PLAY)

    # The floor: what any playbook costs before it does anything.
    empty, ping = [], []
    for i in range(runs):
        empty.append(ctx.pipeline(str(floor_dir / "empty.yml"), {"t1": "postgres"}, "t1", timings=False).seconds)
        ping.append(ctx.pipeline(str(floor_dir / "ping10.yml"), {"t1": "postgres"}, "t1", timings=False).seconds)
    floor, per_task = median(empty), (median(ping) - median(empty)) / 10
    log(f"ansible-playbook floor {floor:.2f} s (empty play), {per_task:.3f} s per module task")
    res.row("ansible-playbook, empty play (startup floor)", floor, "s")
    res.row("ansible-playbook, cost of one module task", per_task, "s")
    res.details["floor"] = {"empty_play_s": empty, "ping10_s": ping}

    # Alternating runs on fresh empty databases.
    pipe, script, script_steps, pipe_cpu, script_cpu, stages = [], [], [], [], [], []
    for i in range(runs):
        order = ("pipeline", "stages", "script") if i % 2 == 0 else ("script", "stages", "pipeline")
        for kind in order:
            db = cl.create_db(f"bench_ovh_{kind}_{i}")
            try:
                if kind == "pipeline":
                    pr = ctx.pipeline("playbooks/migrate.yml", {"t1": db}, "t1", timings=False,
                                      what="migrate.yml on an empty database")
                    pipe.append(pr.seconds)
                    pipe_cpu.append(pr.cpu_seconds)
                    log(f"run {i + 1}/{runs}: pipeline {pr.seconds:.2f} s (CPU {pr.cpu_seconds:.2f} s)")
                elif kind == "stages":
                    pr = ctx.pipeline(str(floor_dir / "stages.yml"), {"t1": db}, "t1", timings=False,
                                      what="the four stage modules on an empty database")
                    stages.append(pr.seconds)
                    log(f"run {i + 1}/{runs}: four stage tasks {pr.seconds:.2f} s (CPU {pr.cpu_seconds:.2f} s)")
                else:
                    sr = run_runbook(cl, db, ctx.workdir)
                    script.append(sr.seconds)
                    script_steps.append(sr.steps)
                    script_cpu.append(sr.cpu_seconds)
                    log(f"run {i + 1}/{runs}: script {sr.seconds:.2f} s (CPU {sr.cpu_seconds:.2f} s)")
            finally:
                cl.drop_db(db)
    ratio = median(pipe) / median(script)
    res.row(f"pipeline migrate.yml, empty db (median of {runs})", median(pipe), "s")
    res.row(f"runbook script bench/runbook.sh (median of {runs})", median(script), "s")
    res.row("ratio pipeline / script", ratio, "x", f"<= {GOAL_RATIO:g}x", ratio <= GOAL_RATIO)
    # What no arrangement of roles and tasks can go below: the stages' own work plus Ansible.
    res.row(f"the four stage modules as four tasks, no roles (median of {runs})", median(stages), "s")
    res.row("ratio four stage tasks / script", median(stages) / median(script), "x")
    res.row("ratio empty play / script", floor / median(script), "x")
    # CPU (user+sys of the client side: ansible-playbook and its workers, or bash and its psql,
    # pg_dump, pg_restore) moves little with the load of a shared machine, unlike wall time.
    res.row(f"pipeline CPU, client side (median of {runs})", median(pipe_cpu), "s")
    res.row(f"script CPU, client side (median of {runs})", median(script_cpu), "s")
    load = os.getloadavg()[0]
    res.row("load average (1 min) after the runs", round(load, 2), "")
    res.details.update({"pipeline_s": pipe, "script_s": script, "script_steps": script_steps, "stages_s": stages,
                        "pipeline_cpu_s": pipe_cpu, "script_cpu_s": script_cpu, "loadavg_1min": load})

    # One profiled run: where the pipeline's time goes.
    db = cl.create_db("bench_ovh_profile")
    try:
        pr = ctx.pipeline("playbooks/migrate.yml", {"t1": db}, "t1", profile=True, what="profiled migrate.yml")
    finally:
        cl.drop_db(db)
    in_tasks = sum(t["seconds"] for t in pr.tasks)
    ran = pr.task_count()
    print("\n--- profile of one pipeline run (ansible.posix.profile_tasks, execution order) ---")
    print(pr.profile or "(profile_tasks printed nothing)")
    print("--- the same run per host (bench_timings callback) ---")
    print(profile_table(pr.tasks))
    print(f"wall {pr.seconds:.2f} s = {in_tasks:.2f} s in tasks + {pr.seconds - in_tasks:.2f} s "
          f"outside them (start-up, inventory, templating, play switches)\n")
    res.row("pipeline tasks run (one target)", ran, "tasks")
    res.row("pipeline time outside tasks (start-up etc.)", pr.seconds - in_tasks, "s")
    by_role: dict = {}
    for t in pr.tasks:
        by_role[t.get("role") or "(play)"] = by_role.get(t.get("role") or "(play)", 0.0) + t["seconds"]
    for role, secs in by_role.items():
        res.row(f"pipeline time in {role} tasks", secs, "s")
    res.details["profile"] = {"wall_s": pr.seconds, "tasks": pr.tasks, "profile_tasks": pr.profile,
                              "by_role_s": by_role}
