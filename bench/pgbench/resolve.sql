-- POST /incidents/{id}/resolve of an ESCALATING incident with a pending level, statement for statement.
\set n :start + :client_id + :nclients * :k
\set k :k + 1
SELECT 1;
BEGIN;
SELECT api_keys.id, api_keys.tenant, api_keys.name, api_keys.prefix, api_keys.secret_hash, api_keys.scope, api_keys.created_at, api_keys.revoked_at FROM api_keys WHERE api_keys.secret_hash = '$hash';
SELECT incidents.id, incidents.tenant, incidents.title, incidents.description, incidents.severity, incidents.state, incidents.policy, incidents.policy_levels, incidents.created_at, incidents.updated_at, incidents.acknowledged_at, incidents.escalated_at, incidents.resolved_at, incidents.cancelled_at FROM incidents WHERE incidents.id = $id AND incidents.tenant = '$tenant' FOR NO KEY UPDATE;
SET LOCAL lock_timeout = 15000\; SET LOCAL statement_timeout = 30000;
UPDATE notifications SET status='SKIPPED', claim_token=NULL, last_error='incident resolved before it was sent', updated_at=clock_timestamp() WHERE notifications.incident_id = $id AND notifications.type = 'incident.escalated' AND notifications.status IN ('PENDING', 'SENDING');
UPDATE incidents SET state='RESOLVED', updated_at=statement_timestamp(), resolved_at=statement_timestamp() WHERE incidents.id = $id RETURNING incidents.updated_at AS now \gset
UPDATE escalations SET status='CANCELLED', updated_at=':now'::timestamptz WHERE escalations.incident_id = $id AND escalations.status = 'PENDING';
INSERT INTO notifications (id, tenant, incident_id, escalation_id, contact_id, channel, type, level, status, next_attempt_at, created_at, updated_at, attempts) SELECT gen_random_uuid(), '$tenant', $id, NULL, contacts.id, contacts.channel, 'incident.resolved', NULL, 'PENDING', ':now'::timestamptz, ':now'::timestamptz, ':now'::timestamptz, 0 FROM contacts WHERE contacts.tenant = '$tenant' AND contacts.status_updates AND contacts.enabled AND contacts.deleted_at IS NULL AND (EXISTS (SELECT notifications.id FROM notifications WHERE notifications.incident_id = $id AND notifications.contact_id = contacts.id AND notifications.type = 'incident.escalated' AND notifications.status IN ('SENT', 'BUNDLED'))) RETURNING notifications.contact_id;
INSERT INTO incident_events (incident_id, type, from_state, to_state, actor, at, data) VALUES ($id, 'resolved', 'ESCALATING', 'RESOLVED', '$key_id'::uuid, ':now'::timestamptz, '{"cancelled_escalations": 1}'::JSONB) RETURNING incident_events.id;
COMMIT;
