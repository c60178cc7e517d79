#!/bin/sh
# PostgreSQL for the compose stack, with the official image's contract where the stack needs it:
# POSTGRES_PASSWORD (required), POSTGRES_USER (default postgres), PGDATA; plus POSTGRES_DATABASES, the
# databases to create (owned by POSTGRES_USER) when the data folder is initialised on the first start.
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user=${POSTGRES_USER:-postgres}
bin=/usr/lib/postgresql/15/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  "$bin/initdb" --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
    --auth-local=trust --auth-host=scram-sha-256
  rm -f "$pwfile"
  # The socket in /tmp: the root filesystem is read-only in the stack, /tmp is a tmpfs.
  printf "listen_addresses = '*'\nunix_socket_directories = '/tmp'\n" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  "$bin/pg_ctl" --pgdata="$PGDATA" --options="-c listen_addresses=''" --wait start
  for db in ${POSTGRES_DATABASES:-}; do
    psql --host=/tmp --username="$user" --dbname=postgres --set=ON_ERROR_STOP=1 \
      --command="CREATE DATABASE \"$db\" OWNER \"$user\""
  done
  "$bin/pg_ctl" --pgdata="$PGDATA" --mode=fast --wait stop
fi
exec "$bin/postgres" -D "$PGDATA"
