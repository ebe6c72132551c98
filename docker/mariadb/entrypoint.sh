#!/bin/sh
# MariaDB for the sluice stack. ROLE=primary: writable. ROLE=replica:
# read_only, replicating from PRIMARY_HOST with GTIDs (MASTER_USE_GTID), so it
# can be promoted with SQL alone (docker/README or the drills:
# STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF).
#
# The first start makes the data directory and, unlogged, the same users and
# schema on every node: replication then carries only the application's rows.
# Passwords come from files (compose secrets), never from the environment.
set -eu
: "${ROLE:?ROLE must be primary or replica}" "${SERVER_ID:?}"
secret() { tr -d '\n' <"/run/secrets/$1"; }
sql_quote() { printf "%s" "$1" | sed "s/'/''/g"; }

datadir=/var/lib/mysql
args="--user=mysql --datadir=$datadir --socket=/run/mysqld/mysqld.sock
      --bind-address=0.0.0.0 --port=3306 --skip-name-resolve
      --server-id=$SERVER_ID --log-bin=mysql-bin --log-slave-updates
      --binlog-format=ROW --gtid-strict-mode=ON
      --innodb-buffer-pool-size=32M --innodb-log-file-size=16M
      --max-connections=500 --skip-log-error --log-warnings=1"
case $ROLE in
primary) ;;
replica) args="$args --read-only=ON" ;;
*) echo "ROLE must be primary or replica, not $ROLE" >&2; exit 2 ;;
esac

if [ ! -d "$datadir/mysql" ]; then
	chown mysql:mysql "$datadir"
	mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
		--auth-root-authentication-method=socket >/dev/null
	# shellcheck disable=SC2086
	mariadbd $args --skip-networking --skip-log-bin --socket=/run/mysqld/init.sock &
	pid=$!
	i=0
	until mariadb-admin --socket=/run/mysqld/init.sock ping >/dev/null 2>&1; do
		i=$((i + 1))
		[ $i -lt 300 ] || { echo "mariadbd did not start for initialisation" >&2; exit 1; }
		sleep 0.1
	done
	{
		echo "CREATE USER 'monitor'@'%' IDENTIFIED BY '$(sql_quote "$(secret monitor_password)")';"
		echo "CREATE USER 'app'@'%' IDENTIFIED BY '$(sql_quote "$(secret app_password)")';"
		echo "CREATE USER 'repl'@'%' IDENTIFIED BY '$(sql_quote "$(secret repl_password)")';"
		echo "GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';"
		echo "CREATE DATABASE app;"
		echo "GRANT SELECT, INSERT, UPDATE, DELETE ON app.* TO 'app'@'%';"
		echo "CREATE TABLE app.visits (id BIGINT AUTO_INCREMENT PRIMARY KEY,
		      request_id VARCHAR(64) NOT NULL UNIQUE, app VARCHAR(32) NOT NULL,
		      at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3));"
		if [ "$ROLE" = replica ]; then
			echo "CHANGE MASTER TO MASTER_HOST='${PRIMARY_HOST:?}', MASTER_PORT=3306,
			      MASTER_USER='repl', MASTER_PASSWORD='$(sql_quote "$(secret repl_password)")',
			      MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;"
		fi
	} | mariadb --socket=/run/mysqld/init.sock
	mariadb-admin --socket=/run/mysqld/init.sock shutdown
	wait "$pid" || true
fi

# shellcheck disable=SC2086
exec mariadbd $args
