-- Indexes and sequence positions, after the COPY of the sample rows (faster, and the
-- demo's `DROP INDEX orders_created_at_idx` has something to drop).
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
CREATE INDEX orders_created_at_idx ON orders (created_at);
CREATE INDEX orders_status_idx ON orders (status) WHERE status IN ('pending', 'paid');

SELECT setval(pg_get_serial_sequence('customers', 'id'), (SELECT max(id) FROM customers));
SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT max(id) FROM orders));

ANALYZE customers;
ANALYZE orders;
