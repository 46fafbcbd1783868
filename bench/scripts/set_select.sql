-- A setting changed in every transaction, then a read: through rdsproxy each SET costs a
-- state check (the session's settings are read from the server and carried with the
-- client) where RDS Proxy would pin the session.
\set aid random(1, 100000 * :scale)
SET work_mem = '8MB';
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
