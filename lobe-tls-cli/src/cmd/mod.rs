//! One module per command.

pub mod account;
pub mod check;
pub mod import;
pub mod issue;
pub mod list;
pub mod renew;
pub mod revoke;
pub mod serve;
pub mod store;
