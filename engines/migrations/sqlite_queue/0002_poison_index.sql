-- Finding jobs that used up their deliveries must not scan every ready job.
CREATE INDEX jobs_by_deliveries ON jobs (deliveries, visible_ms);
