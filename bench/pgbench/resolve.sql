-- POST /incidents/{id}/resolve of an ESCALATING incident with a pending level, statement for statement.
\set n :start + :client_id + :nclients * :k
\set k :k + 1
SELECT 1;
BEGIN;
SELECT api_keys.id, api_keys.tenant, api_keys.name, api_keys.prefix, api_keys.secret_hash, api_keys.scope, api_keys.created_at, api_keys.revoked_at FROM api_keys WHERE api_keys.secret_hash = '$hash';
SELECT incidents.id, incidents.tenant, incidents.title, incidents.description, incidents.severity, incidents.state, incidents.policy, incidents.policy_levels, incidents.created_at, incidents.updated_at, incidents.acknowledged_at, incidents.escalated_at, incidents.resolved_at, incidents.cancelled_at FROM incidents WHERE incidents.id = $id AND incidents.tenant = '$tenant' FOR UPDATE;
SELECT clock_timestamp() AS now \gset
UPDATE incidents SET state='RESOLVED', updated_at=':now'::timestamptz, resolved_at=':now'::timestamptz WHERE incidents.id = $id;
UPDATE escalations SET status='CANCELLED', updated_at=':now'::timestamptz WHERE escalations.incident_id = $id AND escalations.status = 'PENDING' RETURNING escalations.task_id;
INSERT INTO incident_events (incident_id, type, from_state, to_state, actor, at, data) VALUES ($id, 'resolved', 'ESCALATING', 'RESOLVED', '$key_id'::uuid, ':now'::timestamptz, '{"cancelled_escalations": 1}'::JSONB) RETURNING incident_events.id;
COMMIT;
