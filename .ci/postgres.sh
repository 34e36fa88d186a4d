#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests and prints its URL.
#
#   url=$(bash .ci/postgres.sh start DIR)   # DIR: an empty temp directory
#   bash .ci/postgres.sh stop DIR
#
# Installs PostgreSQL from the Debian packages when it is missing (as root),
# initialises a cluster in DIR as the unprivileged `postgres` user, listens
# on 127.0.0.1 on a free port only, and trusts local connections (the
# cluster lives as long as the test run and holds nothing but test data).
set -euo pipefail

cmd=${1:?usage: postgres.sh start|stop DIR}
dir=${2:?usage: postgres.sh start|stop DIR}

bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    echo "$d"
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
}

case "$cmd" in
start)
    if [ -z "$(bindir)" ]; then
        echo "installing postgresql from the Debian packages" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    fi
    bin=$(bindir)
    [ -n "$bin" ] || { echo "no PostgreSQL binaries after install" >&2; exit 1; }
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$dir" postgres
    mkdir -p "$dir"
    chown postgres "$dir"
    chmod 700 "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    # Tests open many schemas and pools at once.
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=400 -c fsync=on" \
        start >&2
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    bin=$(bindir)
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >&2 || true
    ;;
*)
    echo "usage: postgres.sh start|stop DIR" >&2
    exit 2
    ;;
esac
