-- POST /incidents/{id}/escalate (fast policy), statement for statement. Each client takes its own
-- pre-created OPEN incident per transaction: n = start + client_id + nclients * k.
\set n :start + :client_id + :nclients * :k
\set k :k + 1
SELECT 1;
BEGIN;
SELECT api_keys.id, api_keys.tenant, api_keys.name, api_keys.prefix, api_keys.secret_hash, api_keys.scope, api_keys.created_at, api_keys.revoked_at FROM api_keys WHERE api_keys.secret_hash = '$hash';
SELECT incidents.id, incidents.tenant, incidents.title, incidents.description, incidents.severity, incidents.state, incidents.policy, incidents.policy_levels, incidents.created_at, incidents.updated_at, incidents.acknowledged_at, incidents.escalated_at, incidents.resolved_at, incidents.cancelled_at FROM incidents WHERE incidents.id = $id AND incidents.tenant = '$tenant' FOR NO KEY UPDATE;
SELECT tenant_policies.tenant, tenant_policies.name, tenant_policies.version, tenant_policies.body, tenant_policies.created_at, tenant_policies.deleted_at FROM tenant_policies WHERE tenant_policies.tenant = '$tenant' AND tenant_policies.name = 'fast' ORDER BY tenant_policies.version DESC LIMIT 1;
UPDATE incidents SET state='ESCALATING', policy_levels='[{"delay_ms": 1000, "notify": ["in_app"]}, {"delay_ms": 1000, "notify": ["email"]}, {"delay_ms": 1000, "notify": ["sms"]}]'::JSONB, updated_at=statement_timestamp(), escalated_at=statement_timestamp() WHERE incidents.id = $id RETURNING incidents.updated_at AS now \gset
INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at, executed_at, task_id, published_at, created_at, updated_at) VALUES (gen_random_uuid(), $id, 1, 'PENDING', '["in_app"]'::JSONB, ':now'::timestamptz + interval '1 second', NULL, gen_random_uuid()::text, ':now'::timestamptz, ':now'::timestamptz, ':now'::timestamptz);
INSERT INTO incident_events (incident_id, type, from_state, to_state, actor, at, data) VALUES ($id, 'escalated', 'OPEN', 'ESCALATING', '$key_id'::uuid, ':now'::timestamptz, '{"policy": "fast", "levels": 3}'::JSONB) RETURNING incident_events.id;
COMMIT;
