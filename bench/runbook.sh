#!/usr/bin/env bash
# The runbook (/work/shared/runbook.md) as an operator would type it, as one plain script:
# the baseline that `make bench` compares the Ansible pipeline with.
#
#   bench/runbook.sh DATABASE_URL [MIGRATIONS_DIR] [BACKUP_DIR]
#
# Steps: the pre-migration checklist's queries (arrakis_app can log in, no long-running
# query); step 1: pg_dump -Fc and pg_restore --list; step 2: psql -1 -f for each up
# script in order, each followed by the runbook's check for that migration; step 3: the
# runbook's post-migration invariant queries. One psql per command, as in the runbook.
# Prints "step NAME MICROSECONDS" and "dump PATH BYTES" lines for bench/run.py.
set -o errexit -o nounset -o pipefail

url=${1:?usage: runbook.sh DATABASE_URL [MIGRATIONS_DIR] [BACKUP_DIR]}
migrations=${2:-files/migrations}
backup_dir=${3:-/tmp}
export LC_ALL=C

psql_cmd=(psql -X -q -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -d "$url")

now_us() { local t=$EPOCHREALTIME; echo "${t//[!0-9]/}"; }
mark=$(now_us)
start=$mark
step() {  # step NAME: time since the previous mark
    local t
    t=$(now_us)
    echo "step $1 $((t - mark))"
    mark=$t
}
die() { echo "runbook.sh: $*" >&2; exit 1; }

# Run SQL that the runbook expects to fail; succeed only if it fails with one of the SQLSTATEs.
expect_error() {
    local sql=$1 states=$2 out
    if out=$("${psql_cmd[@]}" -c "$sql" 2>&1); then
        die "expected an error ($states) from: $sql"
    fi
    grep -Eq "ERROR: +($states)" <<<"$out" || die "unexpected error from: $sql: $out"
}

# Pre-migration checklist: arrakis_app exists with LOGIN; no active query older than 5 minutes.
[[ $("${psql_cmd[@]}" -At -c "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'arrakis_app'") == t ]] \
    || die "arrakis_app missing or without LOGIN"
[[ $("${psql_cmd[@]}" -At -c "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query_start < now() - interval '5 minutes'") == 0 ]] \
    || die "long-running transactions present"
step checklist

# Step 1: backup, and the runbook's check of it.
dump="$backup_dir/pre-migration-$(date +%Y%m%d%H%M%S)-$$.dump"
pg_dump -Fc -f "$dump" "$url"
step pg_dump
pg_restore --list "$dump" >/dev/null
step pg_restore_list
echo "dump $dump $(stat -c %s "$dump")"

# Step 2: the migrations in order, each in one transaction, each followed by the runbook's check.
applied=()
for file in "$migrations"/[0-9][0-9][0-9][0-9]_*.sql; do
    [[ -e $file ]] || break
    [[ $file == *.down.sql ]] && continue
    "${psql_cmd[@]}" -1 -f "$file"
    version=$(basename "$file")
    version=${version:0:4}
    applied+=("$version")
    case $version in
        0008)
            expect_error "SELECT app.current_community_id();" "P0001" ;;
        0009)
            "${psql_cmd[@]}" -c '\d credit_lots' >/dev/null
            [[ $("${psql_cmd[@]}" -At -c "SELECT relrowsecurity FROM pg_class WHERE relname = 'credit_lots';") == t ]] \
                || die "RLS is not enabled on credit_lots" ;;
        0010)
            [[ -n $("${psql_cmd[@]}" -At -c "SELECT tgname FROM pg_trigger WHERE tgrelid = 'crypto_payments'::regclass;") ]] \
                || die "no trigger on crypto_payments" ;;
        0011)
            [[ -n $("${psql_cmd[@]}" -At -c "SELECT tgname FROM pg_trigger WHERE tgrelid = 'usage_events'::regclass;") ]] \
                || die "no trigger on usage_events" ;;
    esac
done
step migrations

# Step 3: post-migration invariants (only when the ledger tables exist).
if [[ " ${applied[*]} " == *" 0009 "* ]]; then
    # RLS hides every row without a tenant context (0 rows, or the guard's P0001).
    if out=$("${psql_cmd[@]}" -At -c "SET ROLE arrakis_app; SELECT count(*) FROM credit_lots;" 2>&1); then
        [[ $out == 0 ]] || die "arrakis_app sees $out credit_lots rows without a tenant context"
    else
        grep -Eq "ERROR: +P0001" <<<"$out" || die "unexpected error reading credit_lots: $out"
    fi
    # Writing without SET LOCAL context is refused.
    expect_error "SET ROLE arrakis_app; INSERT INTO credit_lots (community_id, source, amount_micro) VALUES (gen_random_uuid(), 'seed', 1000000);" \
        "P0001|42501"
    "${psql_cmd[@]}" -c "SELECT * FROM lot_balances LIMIT 1;" >/dev/null
fi
step verify
echo "step total $(( $(now_us) - start ))"
