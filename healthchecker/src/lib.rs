//! The healthchecker role (not built yet).
//!
//! It will receive every cell's heartbeat straight (not through the queue), detect deaths with an
//! adaptive failure detector, keep the registry of live cells (`GET /cells`, a live event
//! stream), and ask the factory for a replacement whenever a role falls below its minimum.
//! Until then, `cell up`'s supervisor restarts a dead cell in its slot.
