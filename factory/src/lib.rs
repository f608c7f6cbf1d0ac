//! The factory: the pool and the purse. It brings cells to life on machines from providers and
//! takes them down again.
//!
//! Built so far: the [`local`] provider, where each cell is an OS process on this machine, and
//! the [`local::Supervisor`] that `cell up` uses to keep the organism's cells running. The pool
//! providers (IPMI, Wake-on-LAN), the cloud provider (EC2 API), the spending cap and the
//! factory's control-plane role come with later issues.

pub mod local;
pub mod role;
