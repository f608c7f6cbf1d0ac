//! The factory: the pool and the purse. It brings cells to life on machines from providers and
//! takes them down again.
//!
//! Built so far: the [`local`] provider, where each cell is an OS process on this machine; the
//! [`local::Supervisor`] that `cell up` uses to keep its factories running; the [`lease`] that
//! ends every process of an organism when the organism ends; and the factory's control-plane
//! [`role`], whose request keys are shared with its sibling factories through the store's
//! ledger. The pool providers (IPMI, Wake-on-LAN), the cloud provider (EC2 API) and the spending
//! cap come with later issues.

pub mod lease;
pub mod local;
pub mod pool;
pub mod ports;
pub mod power;
pub mod role;
pub mod upgrade;
