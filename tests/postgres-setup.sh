#!/usr/bin/env bash
# Makes a PostgreSQL server ready for the store's PostgreSQL tests:
# - installs Debian's `postgresql` when no server binaries are found (`apt-get update` once,
#   then `apt-get install -y`);
# - creates a cluster of its own under target/postgres (initdb, as the `postgres` user when run
#   as root; under /var/tmp when that user cannot reach target/), with TLS (a test CA and a server certificate for 127.0.0.1 and localhost);
# - starts it listening on 127.0.0.1, port $CLUSTERCLAW_TEST_POSTGRES_PORT (55432 by default),
#   and on a unix socket in target/postgres;
# - creates the role `clusterclaw` (password `clusterclaw`, may create databases) and the
#   database `clusterclaw_test`;
# - writes the URL the tests use to target/postgres-url and the CA to target/postgres-ca.pem,
#   and prints `export CLUSTERCLAW_TEST_POSTGRES_URL=...`.
# Idempotent: a running cluster is left running. `tests/postgres-setup.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

# On a fresh clone nothing has built target/ yet; the URL file and (where reachable) the cluster
# live there.
mkdir -p target
root="$PWD/target/postgres"
data="$root/data"
port="${CLUSTERCLAW_TEST_POSTGRES_PORT:-55432}"
user=clusterclaw
password=clusterclaw
database=clusterclaw_test

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  return 1
}

if ! bin=$(bindir); then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no PostgreSQL server binaries (initdb, pg_ctl) and no apt-get to install them; install PostgreSQL by hand" >&2
    exit 1
  fi
  echo "installing postgresql"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y postgresql
  bin=$(bindir) || { echo "error: postgresql installed but initdb was not found" >&2; exit 1; }
fi

# The server refuses to run as root: the cluster belongs to `postgres` then.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# The cluster lives under target/ when the `postgres` user can reach it there (a checkout under
# a private home directory, such as /root, it cannot); else in a directory of its own under
# /var/tmp named after this checkout.
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$PWD/target" 2>/dev/null; then
  root="/var/tmp/clusterclaw-test-postgres-$(printf '%s' "$PWD" | cksum | cut -d' ' -f1)"
  data="$root/data"
fi

if [ "${1:-}" = stop ]; then
  if [ -f "$data/PG_VERSION" ]; then as_owner "$bin/pg_ctl" -D "$data" -m fast stop || true; fi
  exit 0
fi

mkdir -p "$root"
if [ "$(id -u)" = 0 ]; then chown postgres: "$root"; fi
chmod 0700 "$root"

if [ ! -f "$data/PG_VERSION" ]; then
  echo "creating a PostgreSQL cluster in $data"
  pwfile=$(mktemp)
  echo "$password-superuser" >"$pwfile"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$pwfile"; fi
  as_owner "$bin/initdb" -D "$data" -U postgres --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
fi

# A test CA and a server certificate signed by it, so that clients can verify the server.
if [ ! -f "$data/server.crt" ] && command -v openssl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=clusterclaw test CA" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$tmp/server.key" \
    -out "$tmp/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tmp/ext"
  openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tmp/ext" -out "$tmp/server.crt" 2>/dev/null
  install -m 0600 "$tmp/server.key" "$data/server.key"
  install -m 0644 "$tmp/server.crt" "$data/server.crt"
  install -m 0644 "$tmp/ca.crt" "$root/ca.crt"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$data/server.key" "$data/server.crt" "$root/ca.crt"; fi
  rm -rf "$tmp"
fi

options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$root -c max_connections=200 -c fsync=off"
# (fsync=off: a throwaway cluster for tests, never for data anyone keeps.)
if [ -f "$data/server.crt" ]; then options="$options -c ssl=on"; fi
if ! as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  echo "starting PostgreSQL on 127.0.0.1:$port"
  as_owner "$bin/pg_ctl" -D "$data" -l "$root/server.log" -o "$options" -w -t 60 start >/dev/null
fi

psql_admin() {
  as_owner psql -X -q -v ON_ERROR_STOP=1 -h "$root" -p "$port" -U postgres -d postgres "$@"
}
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$user'")" != 1 ]; then
  psql_admin -c "CREATE ROLE $user LOGIN CREATEDB PASSWORD '$password'"
fi
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE $database OWNER $user"
fi

url="postgres://$user:$password@127.0.0.1:$port/$database"
echo "$url" >target/postgres-url
if [ -f "$root/ca.crt" ]; then cp "$root/ca.crt" target/postgres-ca.pem; fi
echo "export CLUSTERCLAW_TEST_POSTGRES_URL=$url"
