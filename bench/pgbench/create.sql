-- POST /incidents, statement for statement as the endpoint sends them (bench.capture records those).
-- $hash, $key_id, $tenant are filled in by bench.loadgen; :id and :created_at come from \gset.
SELECT 1;
BEGIN;
SELECT api_keys.id, api_keys.tenant, api_keys.name, api_keys.prefix, api_keys.secret_hash, api_keys.scope, api_keys.created_at, api_keys.revoked_at FROM api_keys WHERE api_keys.secret_hash = '$hash';
INSERT INTO incidents (id, tenant, title, description, severity, state, policy, acknowledged_at, escalated_at, resolved_at, cancelled_at) VALUES (gen_random_uuid(), '$tenant', 'checkout is down', '', 'high', 'OPEN', NULL, NULL, NULL, NULL, NULL) RETURNING incidents.id, incidents.created_at, incidents.updated_at \gset
INSERT INTO incident_events (incident_id, type, from_state, to_state, actor, at, data) VALUES (':id'::uuid, 'created', NULL, 'OPEN', '$key_id'::uuid, ':created_at'::timestamptz, '{}'::JSONB) RETURNING incident_events.id;
COMMIT;
