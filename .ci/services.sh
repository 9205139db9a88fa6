#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the tests use are up: start them when they are
# installed but down (`make test`, `.ci/run`), and with --install first install them with
# apt-get when missing (`.ci/run` only). Only services on this machine (127.0.0.1 / localhost)
# are touched; a remote DATABASE_URL or broker is left alone. Exit code 1, with one line saying
# what to start, when a service is down and cannot be started here.
#
#   DATABASE_URL       default postgres://postgres@127.0.0.1:5432/kvmarket (created if missing)
#   CELERY_BROKER_URL  default redis://127.0.0.1:6379/0
set -euo pipefail

INSTALL=0
[ "${1:-}" = "--install" ] && INSTALL=1

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/kvmarket}"
CELERY_BROKER_URL="${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}"

log() { printf '== %s\n' "$*"; }
die() { printf 'make test needs %s\n' "$*" >&2; exit 1; }
is_local() { [[ "$1" =~ ^[a-z+]+://([^@/]*@)?(127\.0\.0\.1|localhost)(:[0-9]+)?(/|$) ]]; }
# url_port URL DEFAULT: the URL's port, or DEFAULT when it names none.
url_port() {
    local hostport="${1#*://}"
    hostport="${hostport#*@}"
    hostport="${hostport%%/*}"
    if [[ "$hostport" == *:* ]]; then echo "${hostport##*:}"; else echo "$2"; fi
}
can_root() { [ "$(id -u)" = 0 ]; }

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- PostgreSQL -----------------------------------------------------------------------------
if is_local "$DATABASE_URL"; then
    PG_PORT="$(url_port "$DATABASE_URL" 5432)"
    if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
        [ "$PG_PORT" = 5432 ] || die "PostgreSQL on 127.0.0.1:$PG_PORT (start it, or set DATABASE_URL)"
        if ! command -v pg_ctlcluster >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1
        then
            [ "$INSTALL" = 1 ] && can_root \
                || die "PostgreSQL on 127.0.0.1:5432 (apt-get install postgresql, start it, or set DATABASE_URL)"
            log "installing PostgreSQL"
            apt_install postgresql postgresql-client
        fi
        can_root || die "PostgreSQL on 127.0.0.1:5432 (sudo pg_ctlcluster <version> main start)"
        log "starting PostgreSQL"
        PG_VERSION="$(ls /etc/postgresql | sort -V | tail -n1)"
        HBA="/etc/postgresql/$PG_VERSION/main/pg_hba.conf"
        # The tests connect as postgres over TCP without a password (a throwaway test cluster).
        if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$HBA"; then
            sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$HBA"
        fi
        pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start
        for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
        pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL on 127.0.0.1:5432 (it did not start)"
    fi
    DB_NAME="${DATABASE_URL##*/}"
    DB_NAME="${DB_NAME%%\?*}"
    psql "${DATABASE_URL%/*}/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='$DB_NAME'" \
        | grep -q 1 || psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$DB_NAME\""
fi

# --- Redis ----------------------------------------------------------------------------------
if is_local "$CELERY_BROKER_URL"; then
    REDIS_PORT="$(url_port "$CELERY_BROKER_URL" 6379)"
    if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
        [ "$REDIS_PORT" = 6379 ] || die "Redis on 127.0.0.1:$REDIS_PORT (start it, or set CELERY_BROKER_URL)"
        if ! command -v redis-server >/dev/null; then
            [ "$INSTALL" = 1 ] && can_root \
                || die "Redis on 127.0.0.1:6379 (apt-get install redis-server and start it, or set CELERY_BROKER_URL)"
            log "installing Redis"
            apt_install redis-server
        fi
        log "starting Redis"
        mkdir -p "${TMPDIR:-/tmp}/kvmarket-redis"
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir "${TMPDIR:-/tmp}/kvmarket-redis" \
            --logfile "${TMPDIR:-/tmp}/kvmarket-redis/redis.log"
        for _ in $(seq 1 30); do redis-cli ping 2>/dev/null | grep -q PONG && break; sleep 0.5; done
        redis-cli ping 2>/dev/null | grep -q PONG || die "Redis on 127.0.0.1:6379 (it did not start)"
    fi
fi
