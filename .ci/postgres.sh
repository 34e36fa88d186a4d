#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests and prints its URL.
#
#   url=$(bash .ci/postgres.sh start DIR)   # DIR: an empty temp directory
#   (the server also speaks TLS; DIR/ca.crt signed its certificate)
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
    # TLS too, with a throwaway CA (DIR/ca.crt) and a server certificate for
    # 127.0.0.1 it signed: the tests connect with sslmode=require and that
    # CA as the only root (plain connections keep working).
    openssl req -new -x509 -days 2 -nodes -subj /CN=snapshots-test-ca \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1
    openssl req -new -nodes -subj /CN=127.0.0.1 \
        -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1
    printf '%s\n' 'subjectAltName=IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
        'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' \
        > "$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.crt" >/dev/null 2>&1
    chown postgres "$dir/server.key" "$dir/server.crt"
    chmod 600 "$dir/server.key"
    chmod 644 "$dir/server.crt"
    # Tests open many schemas and pools at once.
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=400 -c fsync=on -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" \
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
