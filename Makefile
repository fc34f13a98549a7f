# The two commands of the README are `make migrate` and `make test`; the rest are
# their parts. Everything runs from the project root with the venv's tools.
SHELL := /bin/bash
.SHELLFLAGS := -o errexit -o nounset -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
SANDBOX_DIR := .sandbox
# The port the sandbox last ran on (.sandbox/cluster.json), else 55432; inventory/local reads the same.
ifndef SANDBOX_PORT
SANDBOX_PORT := $(shell $(PYTHON) scripts/pgcluster.py port --dir $(SANDBOX_DIR))
endif
BENCH_ARGS ?=

export SANDBOX_PORT
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Keep ansible-lint/molecule caches inside the project, not in $HOME.
export ANSIBLE_HOME := $(CURDIR)/.ansible

.PHONY: help setup collection-link collection sandbox sandbox-stop migrate lint test pytest molecule bench pgbackrest-newer clean

help:
	@echo "make migrate       set up, start the PostgreSQL 15 sandbox, run playbooks/migrate.yml -l local"
	@echo "make test          lint, pytest and every Molecule scenario (PYTEST_WORKERS=1 MOLECULE_WORKERS=1: serially)"
	@echo "make setup         only the virtualenv and the collections"
	@echo "make sandbox       start the sandbox (SANDBOX_PORT=$(SANDBOX_PORT); SANDBOX_ARCHIVE=pgbackrest archives its WAL); make sandbox-stop stops it"
	@echo "make lint          ansible-lint (production), yamllint, squawk, ansible-test sanity"
	@echo "make bench         benchmarks (BENCH_ARGS='--sizes 0,1.5')"
	@echo "make pgbackrest-newer  a pgBackRest with block incremental (2.55.1) in ~/.cache/arrakis-ledger; prints its path"

setup: $(VENV)/.installed .collections/.installed collection-link

# The checkout is the collection arrakis.ledger: Ansible (and pytest) find it by FQCN
# through this link, the same path an installed artifact has.
COLLECTION_LINK := .collections/ansible_collections/arrakis/ledger
collection-link:
	@mkdir -p $(dir $(COLLECTION_LINK))
	@test "$$(readlink $(COLLECTION_LINK) 2>/dev/null)" = ../../.. || ln -sfn ../../.. $(COLLECTION_LINK)

# Re-running is fast: both steps are skipped while their inputs are unchanged.
$(VENV)/.installed: requirements.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	@touch $@

.collections/.installed: requirements.yml $(VENV)/.installed
	$(BIN)/python scripts/install_collections.py requirements.yml .collections
	@touch $@

# The artifact another team installs (and the execution environment bundles): dist/arrakis-ledger-<version>.tar.gz.
collection: setup
	@rm -f dist/arrakis-ledger-*.tar.gz
	$(BIN)/ansible-galaxy collection build --output-path dist .

sandbox:
	@$(PYTHON) scripts/pgcluster.py start --dir $(SANDBOX_DIR) --port $(SANDBOX_PORT) $(if $(SANDBOX_ARCHIVE),--archive $(SANDBOX_ARCHIVE))

sandbox-stop:
	@$(PYTHON) scripts/pgcluster.py stop --dir $(SANDBOX_DIR)

migrate: setup sandbox
	$(BIN)/ansible-playbook playbooks/migrate.yml -l local

lint: setup collection
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint --offline
	$(BIN)/squawk $$(ls files/migrations/[0-9][0-9][0-9][0-9]_*.sql | grep -v '\.down\.sql$$')
	$(BIN)/python scripts/check_ee.py --fetch
	$(BIN)/python scripts/check_ee.py --fetch --self-test
	$(BIN)/python scripts/sanity.py

# pytest-xdist workers: one per core, at most 8 (each starts its own PostgreSQL; the suite is
# Ansible and PostgreSQL processes, CPU-bound). PYTEST_WORKERS=1 runs serially in one process.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 8 ? 8 : n )))
PYTEST_ARGS ?=

pytest: setup
	@$(PYTHON) scripts/pgbouncer_ctl.py install || echo "note: without pgbouncer, the PgBouncer tests are skipped (CI fails them)"
	@$(PYTHON) scripts/pgcluster.py install-pgbackrest --dir $(SANDBOX_DIR) || echo "note: without pgbackrest, the pgBackRest tests are skipped (CI fails them)"
	@$(PYTHON) scripts/sshd_ctl.py install || echo "note: without openssh-server and python3-psycopg2, the pgBackRest remote-host test is skipped (CI fails it)"
	$(BIN)/pytest -n $(if $(filter 0 1,$(PYTEST_WORKERS)),0,$(PYTEST_WORKERS)) $(PYTEST_ARGS)

# Each run takes its own block of free ports (scenario ports are base + offset, a distinct
# offset per scenario): no fixed port, so two checkouts, a busy machine or two scenarios at
# once never collide. `molecule test -s NAME` per scenario, MOLECULE_WORKERS at a time (make -j;
# each scenario's output is printed whole when it ends); MOLECULE_WORKERS=1 runs them in turn.
MOLECULE_SCENARIOS := $(sort $(patsubst molecule/%/molecule.yml,%,$(wildcard molecule/*/molecule.yml)))
MOLECULE_WORKERS ?= $(PYTEST_WORKERS)

molecule: setup
	LEDGER_MOLECULE_PORT_BASE=$${LEDGER_MOLECULE_PORT_BASE:-$$($(PYTHON) scripts/port_block.py --size 100)} \
	  $(MAKE) --no-print-directory -j $(MOLECULE_WORKERS) --output-sync=target $(addprefix molecule-,$(MOLECULE_SCENARIOS))

# A home of its own per scenario: Molecule's prerun (ansible-compat) links and installs collections
# under $$ANSIBLE_HOME, and two scenarios doing that at once would race.
molecule-%:
	@echo "molecule test -s $* (ports from $$LEDGER_MOLECULE_PORT_BASE)"
	ANSIBLE_HOME=$(CURDIR)/.ansible/molecule-$* $(BIN)/molecule test -s $*

test: lint pytest molecule

bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# pgBackRest 2.55.1 (Debian trixie's package, unpacked, not installed) for block incremental:
# LEDGER_PGBACKREST_BIN=$$(python3 scripts/pgbackrest_newer.py) make bench BENCH_ARGS='--only pitr'
pgbackrest-newer:
	@$(PYTHON) scripts/pgbackrest_newer.py

clean: sandbox-stop
	rm -rf $(SANDBOX_DIR) .collections .ansible reports
