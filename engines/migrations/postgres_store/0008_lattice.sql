-- Leases (engines/src/politeness.rs): a host's lattice of lanes, and the lane a permit leases.
ALTER TABLE host_ledger ADD COLUMN lattice_base_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_ledger ADD COLUMN lattice_gap_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_ledger ADD COLUMN lattice_lanes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_ledger ADD COLUMN lattice_until_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE host_permits ADD COLUMN lane BIGINT;
