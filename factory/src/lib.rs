//! The factory: the pool and the purse. It brings cells to life on machines from providers and
//! takes them down again.
//!
//! The [`local`] provider, where each cell is an OS process on this machine; the
//! [`local::Supervisor`] that `cell up` uses to keep its factories running; the [`lease`] that
//! ends every process of an organism when the organism ends; the factory's control-plane
//! [`role`], whose request keys are shared with its sibling factories through the store's
//! ledger; the server [`pool`] and its purse, with the [`power`] providers (local machines,
//! IPMI, Wake-on-LAN, EC2); the live [`upgrade`], and the [`release`] pool machines fetch.

pub mod lease;
pub mod local;
pub mod pool;
pub mod ports;
pub mod power;
pub mod release;
pub mod role;
pub mod upgrade;
